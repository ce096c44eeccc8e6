"""The ``rlfleet`` command line: each sub-command lives in the module that owns its work."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import get_args

from rlfleet.common import startup_trace

startup_trace.mark("python started")  # before the imports: this module is the first one loaded

from rlfleet.common.config import Algorithm  # noqa: E402

ALGORITHMS = ", ".join(get_args(Algorithm))
"""Every algorithm a job config's ``algorithm`` takes, as the help names them."""

# sub-command -> (module, help). Each module defines add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "tiny-model": ("rlfleet.tasks.tiny_model", "build the tiny GPT-2 and tokenizer offline"),
    "train": (
        "rlfleet.job.train",
        f"run a training job ({ALGORITHMS}) on local Ray, or inside a submitted Ray job",
    ),
    "submit": ("rlfleet.job.submit", f"submit a training job ({ALGORITHMS}) to a Ray cluster"),
    "checkpoints": ("rlfleet.checkpoint.command", "list or pull checkpoints"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlfleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    startup_trace.mark("imports done")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
