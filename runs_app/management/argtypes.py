"""argparse ``type=`` converters shared by the management commands (and the example project's).

They raise ``argparse.ArgumentTypeError``, so a bad value is an argparse error: exit status 2 with
the usage line on the command line, ``CommandError`` under ``call_command``.
"""

from __future__ import annotations

import argparse
import math

from ..conf import MAX_DURATION_SECONDS


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value > MAX_DURATION_SECONDS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is too long: the limit is {MAX_DURATION_SECONDS} seconds (100 years)"
        )
    return value


def positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer (1 or more)")
    return value


def non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 0")
    return value


def positive_seconds(text: str) -> float:
    value = _seconds(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def non_negative_seconds(text: str) -> float:
    value = _seconds(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds >= 0")
    return value
