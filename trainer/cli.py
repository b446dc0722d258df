"""The command table. Each command is a plain function elsewhere; its signature and
docstring are its --help. Errors a person can fix exit 2 with one line (--debug shows
the traceback)."""

from __future__ import annotations

import os
import sys

import fire

from trainer.errors import UserError
from trainer.metrics import setup_logging


# command -> "module:function"; only the chosen command's module is imported, so `trainer train`
# does not pay for FastAPI (serve) or the GRPO stack at start-up
COMMANDS = {
    "prepare": "trainer.data:prepare_command",
    "train": "trainer.train:train_command",
    "resume": "trainer.train:resume_command",
    "sample": "trainer.generate:sample_command",
    "export": "trainer.model:export_command",
    "evaluate": "trainer.evaluate:evaluate_command",
    "doctor": "trainer.offline:doctor_command",
    "grpo": "trainer.grpo.loop:grpo_command",
    "sweep": "trainer.grpo.sweep:sweep_command",
    "serve": "trainer.serve:serve",
}


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


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or "--help" in argv or "-h" in argv:
        print(_help(_commands(), argv[0] if argv else None))
        return
    debug = "--debug" in argv or os.environ.get("TRAINER_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # log lines (warnings too) go to stdout from the first one; unconfigured, logging would put
    # them on stderr beside the one-line error
    setup_logging()
    try:
        if argv[0] not in COMMANDS:
            raise UserError(f"unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)} (trainer --help)")
        fire.Fire(_load(argv[0]), command=argv[1:], name=f"trainer {argv[0]}", serialize=lambda result: None)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
