"""argparse ``type=`` converters shared by the management commands (and the example project's).

They raise ``argparse.ArgumentTypeError``, so a bad value is an argparse error: exit status 2 with
the usage line on the command line, ``CommandError`` under ``call_command``.
"""

from __future__ import annotations

import argparse
import math

from django.apps import apps
from django.db.models import Model

from ..conf import MAX_DURATION_SECONDS
from ..tracking import is_tracked


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


def tracked_model(text: str) -> type[Model]:
    """A tracked model named by its label, ``app_label.ModelName`` (case-insensitive)."""
    try:
        model = apps.get_model(text)
    except (LookupError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a model of the project (give app_label.ModelName)"
        ) from None
    if not is_tracked(model):
        raise argparse.ArgumentTypeError(f"{text!r} is not a tracked model (a TrackedModel)")
    return model
