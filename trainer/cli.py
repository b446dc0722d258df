"""The command table. Each command is a plain function in trainer/commands.py; its signature
and docstring are its --help. Errors a person can fix exit 2 with one line (--debug shows
the traceback)."""

from __future__ import annotations

import os
import sys

# Before torch loads libgomp: a thread waiting at an OpenMP barrier spins ~1000 rounds, then
# sleeps. libgomp's default spins ~300k rounds, which on a shared host burns the time slice a
# descheduled sibling thread needs, so each parallel region waits a scheduler tick: beside one
# busy process the default config ran at 0.79 of its fair share, with 1000 at 1.20, and alone
# at 1.05x (bench/threads.py). Numbers are unchanged: it only decides how threads wait.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")
# Also before torch loads: c10's own log (c10d's per-connection warnings, such as "the hostname of
# the client socket cannot be retrieved" in a network_mode none container) shows errors only.
# Set TORCH_CPP_LOG_LEVEL=INFO to see it all when debugging many processes.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

import fire

from trainer.errors import UserError, one_line, out_of_memory
from trainer.metrics import setup_logging


# command -> "module:function"; each command imports what it needs when it runs, so `trainer train`
# does not pay for FastAPI (serve) or the GRPO stack at start-up
COMMANDS = {name: f"trainer.commands:{name}_command" for name in
            ("prepare", "train", "resume", "sample", "export", "evaluate", "runs", "doctor", "grpo", "sweep",
             "corpus", "serve")}


def _load(name: str):
    import importlib

    module, function = COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), function)


def _commands() -> dict:
    return {name: _load(name) for name in COMMANDS}


def _help(commands: dict, name: str | None) -> str:
    """fire would take --help as a config override for commands with **overrides, so help is ours."""
    import inspect

    if name not in commands:
        rows = [f"  {cmd:<9} {(inspect.getdoc(fn) or '').splitlines()[0]}" for cmd, fn in commands.items()]
        return "usage: trainer <command> [--flags]   (trainer <command> --help for its flags)\n\ncommands:\n" + \
            "\n".join(rows)
    fn = commands[name]
    text = f"usage: trainer {name} {inspect.signature(fn)}\n\n{inspect.getdoc(fn) or ''}"
    if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values()):
        from trainer.config import ALIASES, reference_text

        aliases = ", ".join(f"--{a} = --{k}" for a, k in ALIASES.items())
        text += f"\n\nconfig keys (defaults shown; also TRAINER_<SECTION>_<KEY>):\n{reference_text()}\n\nshort forms: {aliases}"
    return text


def _check_repeats(argv: list[str]) -> None:
    """fire keeps the last of `--train.max_steps=3 --train.max_steps=5`; a repeat is a mistake."""
    from trainer.config import ALIASES

    seen: dict[str, str] = {}
    for arg in argv:
        if not arg.startswith("--") or arg == "--":
            continue
        flag = arg[2:].split("=", 1)[0]
        key = ALIASES.get(flag, flag).replace("-", "_")
        if key in seen:
            forms = f" (as --{seen[key]} and --{flag})" if seen[key] != flag else ""
            raise UserError(f"--{key} is given twice{forms}; pass it once")
        seen[key] = flag


def _parse(fn, argv: list[str], name: str) -> dict:
    """fire reads argv against fn's signature -> {parameter: value}, the **overrides merged in.

    fire.Fire has no parse-only mode: it calls what it is given and only then notices an
    argument that nothing took, prints its usage block to stderr and raises FireExit(2). So it
    is given a stand-in that records the call instead of running the command, its stderr is
    dropped, and what went wrong is read from FireExit's trace (the error, and the arguments
    it could not use) instead of from the text it printed."""
    import contextlib
    import functools
    import inspect
    import io

    got: dict = {}

    @functools.wraps(fn)  # fire reads fn's signature through __wrapped__
    def record(*args, **kwargs):
        got["call"] = inspect.signature(fn).bind(*args, **kwargs).arguments

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            fire.Fire(record, command=argv, name=name)
    except fire.core.FireExit as e:
        step = e.trace.elements[-1]
        if "call" in got and step.HasError():  # the call took what it could; these were left over
            raise UserError(f"unexpected argument {step.args[0]!r} for `{name}`; options look like --key=value "
                            f"(`{name} --help` lists them)") from None
        if step.HasError():  # before the call: a required argument missing, an ambiguous -x
            raise UserError(f"{name}: {step.ErrorAsStr()} (`{name} --help`)") from None
    if "call" not in got:  # fire's own flags after a lone `--` (--trace, --help): nothing to run
        raise UserError(f"{name}: could not read the arguments {' '.join(argv)!r} (`{name} --help`)")
    return _typed(fn, got["call"], name)


def _typed(fn, arguments: dict, name: str) -> dict:
    """Check each named argument against its annotation, as config keys are checked: a wrong
    type is one line naming the argument before the command starts. (fire reads `5` as an int
    and `abc` as a string whatever the annotation says.)"""
    import inspect
    import typing

    from trainer.config import coerce

    signature = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    out = {}
    for param, value in arguments.items():
        if signature.parameters[param].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)  # config overrides: checked by the config loader
            continue
        options = [t for t in typing.get_args(hints.get(param)) if t is not type(None)] or [hints.get(param)]
        if value is True and options != [bool]:  # fire's reading of a bare `--run` with no value
            raise UserError(f"--{param} needs a value, e.g. --{param}=VALUE (`{name} --help`)")
        if value is not None and len(options) == 1 and options[0] in (int, float, str, bool):
            value = coerce(value, options[0], f"--{param}", from_text=True)
        out[param] = value
    return out


def main(argv: list[str] | None = None) -> None:
    from trainer.signals import STOP, Stopped

    STOP.install()  # from here on a signal ends the command in a defined state (trainer/signals.py)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TRAINER_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    try:
        if not argv or argv[0] in ("-h", "--help") or "--help" in argv or "-h" in argv:
            print(_help(_commands(), argv[0] if argv else None))
            return
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # log lines (warnings too) go to stdout from the first one; unconfigured, logging would put
        # them on stderr beside the one-line error
        setup_logging()
        if argv[0] not in COMMANDS:
            raise UserError(f"unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)} (trainer --help)")
        name = f"trainer {argv[0]}"
        _check_repeats(argv[1:])
        fn = _load(argv[0])
        fn(**_parse(fn, argv[1:], name))
    except UserError as e:
        if debug:
            raise
        if os.environ.get("RANK", "0") in ("", "0"):  # under torchrun rank 0 says it, not every rank
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except RuntimeError as e:  # torch.OutOfMemoryError, or the CPU allocator's
        problem = out_of_memory(e, argv[0])
        if problem is None or debug:
            raise
        rank = os.environ.get("RANK", "0")  # one rank may run out alone: each says so
        print(f"error: {'' if rank in ('', '0') else f'rank {rank}: '}{problem}", file=sys.stderr, flush=True)
        sys.exit(2)
    except BrokenPipeError:  # the reader went away (`trainer --help | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except (Stopped, KeyboardInterrupt) as e:
        signum = getattr(e, "signum", 2)
        what = f"`trainer {argv[0]}`" if argv else "trainer"
        print(f"stopped by {e if isinstance(e, Stopped) else 'SIGINT'} before {what} finished; nothing was left "
              "half-written: run the same command again", file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    finally:
        STOP.uninstall()


if __name__ == "__main__":
    main()
