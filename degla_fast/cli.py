"""``degla-fast`` command line: one sub-command per job.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only routes to it. Only the chosen command's module is
imported, so ``degla-fast negatives`` never pays for DeepSpeed or DALI.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import ConfigError, DeglaError
from .fields import yaml_value
from .stop_signals import StopNow, stop_request

# name -> (module, one-line help)
COMMANDS = {
    "synth": ("degla_fast.data.synthetic", "render the synthetic compositional dataset"),
    "train": ("degla_fast.train.main", "fine-tune a CLIP model with DeGLA"),
    "eval": ("degla_fast.evaluate.cli", "evaluate a model on a compositional or zero-shot benchmark"),
    "negatives": ("degla_fast.negatives.cli", "generate hard-negative captions"),
    "export": ("degla_fast.train.export", "export a checkpoint's student as a plain open_clip state dict"),
    "experiment": ("degla_fast.experiment", "run the local DeGLA ablation on the synthetic dataset"),
}


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help with every flag's default, written as YAML writes it (``null``, ``true``),
    unless the flag's help already says it; a required flag says so instead."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text \
                or "required" in text:
            return text
        if action.required:
            return f"{text} (required)"
        return f"{text} (default: {yaml_value(action.default).replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are user errors like any other: one line, exit
    status 2 (argparse prints its whole usage block first). ``--help`` still prints the usage,
    with every flag's default (:class:`HelpFormatter`). Sub-command parsers are made of this
    class too (``add_subparsers`` uses the parent's)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise ConfigError(f"{message} (see {self.prog} --help)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only ``command``'s flags are loaded (all names are listed)."""
    parser = Parser(prog="degla-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module_name)
        if name == command:
            importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; ``argv`` defaults to ``sys.argv[1:]``. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    # The trainer's imports take seconds: a stop signal during them is a stop request already.
    installed = command == "train" and stop_request.install()
    try:
        args, unknown = build_parser(command).parse_known_args(argv)
        if unknown:  # named here, with the sub-command whose --help lists its flags
            raise ConfigError(f"unrecognized arguments: {' '.join(unknown)} (see degla-fast {args.command} --help)")
        return int(importlib.import_module(args._module).run(args) or 0)
    except DeglaError as err:
        print(f"degla-fast: error: {err}", file=sys.stderr)
        return 2
    except StopNow as stop:
        print(f"degla-fast: {stop}", file=sys.stderr)
        return stop.status
    finally:
        if installed:
            stop_request.restore()


if __name__ == "__main__":
    sys.exit(main())
