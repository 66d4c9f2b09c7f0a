"""The ``RUNS_APP`` settings dict, declared once: each setting is one ``Setting`` line of
``RunsAppSettings`` giving its type, default, validator, what a valid value is, and its check id.

``conf`` reads that table for the defaults and typed access (``runs_settings.FLUSH_BATCH_SIZE``
is an ``int`` for mypy); ``checks`` reads the same table for the system checks. Adding a setting
is adding one line to ``RunsAppSettings`` (and one case to ``tests/test_checks.py``).

Values are read from ``django.conf.settings`` on every access (no cache), so
``override_settings(RUNS_APP=...)`` in a test takes effect at once. Access never validates: a
malformed value is reported by ``manage.py check``, which Django runs before every command.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

from django.conf import settings as django_settings

#: The longest duration a setting or argument takes: 100 years, far beyond any sensible staleness
#: or retention, and far below what ``datetime`` arithmetic overflows at.
MAX_DURATION_SECONDS = 100 * 365 * 24 * 3600

#: The most consecutive runs a grace period may span (``sync_grace_runs``, CLEANUP_GRACE_RUNS).
MAX_GRACE_RUNS = 1000

NOTIFY_CHANNEL_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

T = TypeVar("T")


def user_settings() -> Any:
    """The raw ``settings.RUNS_APP`` value (``{}`` when absent); may be malformed."""
    return getattr(django_settings, "RUNS_APP", {})


# --- validators: is a configured value acceptable? ----------------------------------------------


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` is no batch size)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite ``int`` or ``float`` (not a ``bool``, not NaN or infinite)."""
    if not (is_int(value) or isinstance(value, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float: finite, but no setting can use it
        return False


def is_positive_int(value: Any) -> bool:
    return is_int(value) and value > 0


def is_duration(value: Any) -> bool:
    """A positive number of seconds, at most ``MAX_DURATION_SECONDS``."""
    return is_number(value) and 0 < value <= MAX_DURATION_SECONDS


DURATION = f"a positive number of seconds, at most {MAX_DURATION_SECONDS} (100 years)"


# --- the table ---------------------------------------------------------------------------------


class Setting(Generic[T]):
    """One key of ``RUNS_APP``: declared as an attribute of ``RunsAppSettings``, whose name is
    the key. Reading it on ``runs_settings`` gives the configured value, else ``default``.

    ``is_valid`` and ``expected`` ("it must be ...") drive the system check ``check_id``; the
    check's hint is ``hint`` when given, else "fix it or remove it to use the default"."""

    key: str

    def __init__(
        self,
        default: T,
        *,
        check_id: str,
        is_valid: Callable[[Any], bool],
        expected: str,
        hint: str = "",
    ) -> None:
        self.default = default
        self.check_id = check_id
        self.is_valid = is_valid
        self.expected = expected
        self.hint = hint

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> Setting[T]: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> T: ...

    def __get__(self, instance: object | None, owner: type | None = None) -> T | Setting[T]:
        if instance is None:
            return self  # RunsAppSettings.KEY: the declaration itself
        return self.value()

    def value(self) -> T:
        """The effective value: the configured one (unvalidated) or the default."""
        configured = user_settings()
        if isinstance(configured, dict) and self.key in configured:
            value: T = configured[self.key]
            return value
        return self.default


class RunsAppSettings:
    """The settings table and attribute access to the effective values:
    ``runs_settings.FLUSH_BATCH_SIZE``. The declaration order is the order checks report in."""

    MAX_PAYLOAD_BYTES = Setting[int](
        262144,
        check_id="runs_app.E003",
        is_valid=is_positive_int,
        expected="a positive integer (bytes)",
    )
    FLUSH_BATCH_SIZE = Setting[int](
        1000,
        check_id="runs_app.E004",
        is_valid=is_positive_int,
        expected="a positive integer (rows)",
    )
    CLEANUP_BATCH_SIZE = Setting[int](
        1000,
        check_id="runs_app.E005",
        is_valid=is_positive_int,
        expected="a positive integer (rows)",
    )
    CLEANUP_MAX_DELETE_FRACTION = Setting[float](
        0.5,
        check_id="runs_app.E006",
        is_valid=lambda v: is_number(v) and 0 < v <= 1,
        expected="a number greater than 0 and at most 1",
    )
    CLEANUP_MAX_DELETE_COUNT = Setting[int | None](
        None,
        check_id="runs_app.E007",
        is_valid=lambda v: v is None or (is_int(v) and v >= 0),
        expected="None (no limit) or an integer >= 0",
    )
    CLEANUP_GRACE_RUNS = Setting[int](
        1,
        check_id="runs_app.E023",
        is_valid=lambda v: is_int(v) and 1 <= v <= MAX_GRACE_RUNS,
        expected=f"an integer from 1 to {MAX_GRACE_RUNS} (runs)",
    )
    TOMBSTONE_RETENTION = Setting[float | None](
        None,
        check_id="runs_app.E024",
        is_valid=lambda v: v is None or is_duration(v),
        expected="None or " + DURATION,
    )
    RUN_STALE_AFTER = Setting[float](
        3600,
        check_id="runs_app.E008",
        is_valid=is_duration,
        expected=DURATION,
    )
    PUBLISHER = Setting[str](
        "runs_app.publishers.LoggingPublisher",
        check_id="runs_app.E009",
        is_valid=lambda v: isinstance(v, str) and "." in v and not v.startswith("."),
        expected='a dotted import path such as "runs_app.publishers.LoggingPublisher"',
    )
    PUBLISHER_OPTIONS = Setting[dict[str, Any]](
        {},
        check_id="runs_app.E010",
        is_valid=lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
        expected="a dict of keyword arguments for the publisher class",
    )
    DRAIN_BATCH_SIZE = Setting[int](
        100,
        check_id="runs_app.E011",
        is_valid=is_positive_int,
        expected="a positive integer (events)",
    )
    DRAIN_MAX_BYTES = Setting[int](
        32 * 1024 * 1024,
        check_id="runs_app.E022",
        is_valid=is_positive_int,
        expected="a positive integer (bytes of event payloads read per claim)",
    )
    LEASE_SECONDS = Setting[float](
        60,
        check_id="runs_app.E012",
        is_valid=is_duration,
        expected=DURATION,
    )
    MAX_ATTEMPTS = Setting[int](
        10,
        check_id="runs_app.E013",
        is_valid=is_positive_int,
        expected="a positive integer",
    )
    RETRY_BASE_SECONDS = Setting[float](
        1.0,
        check_id="runs_app.E014",
        is_valid=is_duration,
        expected=DURATION,
    )
    RETRY_MAX_SECONDS = Setting[float](
        600.0,
        check_id="runs_app.E015",
        is_valid=is_duration,
        expected=DURATION,
        # That it is at least RETRY_BASE_SECONDS is a relation between two settings: E025.
    )
    POLL_INTERVAL = Setting[float](
        1.0,
        check_id="runs_app.E016",
        is_valid=is_duration,
        expected=DURATION,
    )
    NOTIFY = Setting[bool](
        True,
        check_id="runs_app.E017",
        is_valid=lambda v: isinstance(v, bool),
        expected="True or False",
    )
    NOTIFY_CHANNEL = Setting[str](
        "runs_app_outbox",
        check_id="runs_app.E018",
        is_valid=lambda v: isinstance(v, str) and bool(NOTIFY_CHANNEL_PATTERN.match(v)),
        expected="a PostgreSQL identifier: a letter or _, then letters, digits or _, 63 at most",
    )


#: Every setting by key, in declaration order: the one table ``checks`` and the docs read.
SETTINGS: dict[str, Setting[Any]] = {
    name: value for name, value in vars(RunsAppSettings).items() if isinstance(value, Setting)
}

#: The defaults by key (derived from ``SETTINGS``).
DEFAULTS: dict[str, Any] = {key: setting.default for key, setting in SETTINGS.items()}

runs_settings = RunsAppSettings()
