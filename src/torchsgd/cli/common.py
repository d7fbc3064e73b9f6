"""Small pieces every command shares: argument types, the output folder, the console."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from rich.console import Console

DEFAULT_OUT = "out"


def console() -> Console:
    """A console on the current ``sys.stdout`` (made per call so redirected or captured output works)."""
    return Console(highlight=False)


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=DEFAULT_OUT,
        help=f"folder for the files this command writes, created if missing (default: {DEFAULT_OUT}/)",
    )


def out_dir(path: str) -> Path:
    """The ``--out`` folder, created if missing."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {path}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def finite_float(text: str) -> float:
    """An argparse type: a finite real number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def float_list(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated finite numbers, e.g. ``5,3,6``."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 5,3,6, got {text!r}")
    return tuple(finite_float(item) for item in items)


def _int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1."""
    return _int_at_least(text, 1)


def seed_int(text: str) -> int:
    """An argparse type: a seed, an integer in [0, 2³²) (what both torch and scikit-learn accept)."""
    value = _int_at_least(text, 0)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be below 2**32, got {value}")
    return value
