"""``torchsgd``: the command-line entry point; each subcommand lives in its own module of this package.

A command module has ``add_arguments(parser)`` and ``run(args) -> int``. Modules are
imported when the parser is built, so a missing module (``bench`` before it lands) or a missing ``cli``
extra turns into a one-line message for that command only.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

import torchsgd

# name → (module, one-line help)
COMMANDS = {
    "demo": ("torchsgd.cli.demo", "train a small convnet on the digits data with torch.optim.SGD and torchsgd"),
    "explain": ("torchsgd.cli.explain", "the article's momentum example (5, 3, 6), step by step with torchsgd's rule"),
    "trajectories": (
        "torchsgd.cli.trajectories",
        "plot SGD, momentum and Nesterov paths on a quadratic and Rosenbrock",
    ),
    "bench": ("torchsgd.cli.bench", "step-time ratios of torchsgd against torch.optim.SGD"),
    "build": ("torchsgd.cli.build", "compile the native CPU kernel into the cache ahead of time (--force rebuilds)"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The parser, and a message for each command whose module cannot be imported."""
    parser = argparse.ArgumentParser(
        prog="torchsgd",
        description="torchsgd: SGD for PyTorch, an exact drop-in for torch.optim.SGD.",
        epilog="Run 'torchsgd COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"torchsgd {torchsgd.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    unavailable: dict[str, str] = {}
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module: ModuleType | None = importlib.import_module(module_name)
        except ImportError as error:
            module, unavailable[name] = None, unavailable_message(name, module_name, error)
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if module is not None:
            module.add_arguments(sub)
            sub.set_defaults(handler=module.run)
    return parser, unavailable


def unavailable_message(name: str, module_name: str, error: ImportError) -> str:
    if error.name == module_name:
        return f"torchsgd {name}: this command is not available in this version of torchsgd"
    return f"torchsgd {name}: needs {error.name or error}, which is not installed (pip install 'torchsgd[cli]')"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, unavailable = build_parser()
    if argv and argv[0] in unavailable:  # whatever its options, a missing command says only that
        print(unavailable[argv[0]], file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits for --help, --version and usage errors
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args.handler(args)
    except (ValueError, TypeError, OSError) as error:
        # The library's own messages ("Invalid momentum value: -1.0") are meant for the user as they are.
        print(f"torchsgd {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"torchsgd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
