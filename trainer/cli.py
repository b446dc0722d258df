"""The command table. Each command is a plain function elsewhere; its signature and
docstring are its --help. Errors a person can fix exit 2 with one line (--debug shows
the traceback)."""

from __future__ import annotations

import os
import sys

import fire

from trainer.errors import UserError
from trainer.metrics import setup_logging


def _commands() -> dict:
    from trainer.data import prepare_command
    from trainer.generate import sample_command
    from trainer.model import export_command
    from trainer.offline import doctor_command
    from trainer.train import resume_command, train_command

    return {
        "prepare": prepare_command,
        "train": train_command,
        "resume": resume_command,
        "sample": sample_command,
        "export": export_command,
        "doctor": doctor_command,
    }


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TRAINER_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # log lines (warnings too) go to stdout from the first one; unconfigured, logging would put
    # them on stderr beside the one-line error
    setup_logging()
    try:
        fire.Fire(_commands(), command=argv, name="trainer", serialize=lambda result: None)
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
