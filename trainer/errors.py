"""The one exception type for user mistakes, and the one way to make an error one line.

A UserError becomes a single line on stderr and exit code 2 (see cli.main); anything
else is a bug and keeps its traceback.
"""

import re


class UserError(Exception):
    """Bad input from a person: a config key, a file, a value. The message names it and the fix."""


def one_line(message, limit: int = 0) -> str:
    """A message as one line (library errors, torch's unpickling ones say, span lines); cut to
    `limit` characters when one is given."""
    text = " ".join(str(message).split()) or type(message).__name__
    return text if not limit or len(text) <= limit else text[:limit] + "..."


def reason(e: BaseException) -> str:
    """A library error as a short clause for "... is unreadable (<reason>)": an OSError's
    strerror, else the first sentence of its message. torch's unpickler explains at length how
    to turn its safety off, which is wrong advice for a file from disk: keep only what it refused."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).split("WeightsUnpickler error:", 1)[-1]
    chunks = [c for c in re.split(r"\n\s*\n", text) if c.strip()]
    text = one_line("".join(ch if ch.isprintable() else " " for ch in (chunks or [""])[0]))
    return text.split(". ", 1)[0][:200] if chunks else type(e).__name__


# what to lower when a command runs out of memory; the rest get OUT_OF_MEMORY_DEFAULT
OUT_OF_MEMORY_FIX = {
    "train": "lower train.batch_size and raise train.grad_accum (the same tokens per step), model.block_size, or the "
             "model's size",
    "grpo": "lower grpo.minibatch_size (and grpo.rollout_batch with the local backend), or give a server on the same "
            "GPU less of it (vLLM's --gpu-memory-utilization, 0.4 in docker-compose.cuda.yml)",
}
OUT_OF_MEMORY_FIX.update(resume=OUT_OF_MEMORY_FIX["train"], sweep=OUT_OF_MEMORY_FIX["train"])
OUT_OF_MEMORY_DEFAULT = "free memory on the device, or run a smaller model"
_SIZE = r"([\d.]+ (?:[KMGT]iB|bytes))"


def out_of_memory(e: BaseException, command: str) -> str | None:
    """A device or host allocation failure (torch.OutOfMemoryError, the CPU allocator's
    RuntimeError) as one line: how much was asked for, what was free, what this process held
    (the rest of a GPU is other processes', such as a vLLM server sharing it) and what to lower
    for `command`. None for any other error, which keeps its traceback."""
    text = str(e)
    if not isinstance(e, RuntimeError) or not ("out of memory" in text or "can't allocate memory" in text):
        return None
    fix = OUT_OF_MEMORY_FIX.get(command, OUT_OF_MEMORY_DEFAULT)
    if "CUDA out of memory" in text:
        asked = re.search(r"Tried to allocate " + _SIZE, text)
        room = re.search(r"total capacity of " + _SIZE + " of which " + _SIZE + " is free", text)
        own = re.search(r"this process has " + _SIZE + " memory in use", text)
        facts = [f"tried to allocate {asked[1]}" if asked else "",
                 f"{room[2]} free of {room[1]}" if room else "",
                 f"this process held {own[1]}; the rest is other processes'" if own else ""]
        facts = "; ".join(f for f in facts if f) or reason(e)
        return f"`trainer {command}` ran out of GPU memory ({facts}); {fix}"
    asked = re.search(r"tried to allocate (\d+) bytes", text)
    facts = f"tried to allocate {int(asked[1]) / 2**30:.2f} GiB at once" if asked else reason(e)
    return f"`trainer {command}` ran out of host memory ({facts}); {fix}"
