"""The ``RUNS_APP`` settings dict: defaults and lazy access.

Values are read from ``django.conf.settings`` on every access (no cache), so
``override_settings(RUNS_APP=...)`` in a test takes effect at once. Validation lives in
``checks.py``; this module only merges the user's dict over the defaults.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings as django_settings

#: The longest duration a setting or argument takes: 100 years, far beyond any sensible staleness
#: or retention, and far below what ``datetime`` arithmetic overflows at.
MAX_DURATION_SECONDS = 100 * 365 * 24 * 3600

DEFAULTS: dict[str, Any] = {
    "MAX_PAYLOAD_BYTES": 262144,
    "FLUSH_BATCH_SIZE": 1000,
    "CLEANUP_BATCH_SIZE": 1000,
    "CLEANUP_MAX_DELETE_FRACTION": 0.5,
    "CLEANUP_MAX_DELETE_COUNT": None,
    "CLEANUP_GRACE_RUNS": 1,
    "TOMBSTONE_RETENTION": None,
    "RUN_STALE_AFTER": 3600,
    "PUBLISHER": "runs_app.publishers.LoggingPublisher",
    "PUBLISHER_OPTIONS": {},
    "DRAIN_BATCH_SIZE": 100,
    "DRAIN_MAX_BYTES": 32 * 1024 * 1024,
    "LEASE_SECONDS": 60,
    "MAX_ATTEMPTS": 10,
    "RETRY_BASE_SECONDS": 1.0,
    "RETRY_MAX_SECONDS": 600.0,
    "POLL_INTERVAL": 1.0,
    "NOTIFY": True,
    "NOTIFY_CHANNEL": "runs_app_outbox",
}


def user_settings() -> Any:
    """The raw ``settings.RUNS_APP`` value (``{}`` when absent); may be malformed."""
    return getattr(django_settings, "RUNS_APP", {})


class RunsAppSettings:
    """Attribute access to the effective settings: ``runs_settings.FLUSH_BATCH_SIZE``."""

    MAX_PAYLOAD_BYTES: int
    FLUSH_BATCH_SIZE: int
    CLEANUP_BATCH_SIZE: int
    CLEANUP_MAX_DELETE_FRACTION: float
    CLEANUP_MAX_DELETE_COUNT: int | None
    CLEANUP_GRACE_RUNS: int
    TOMBSTONE_RETENTION: float | None
    RUN_STALE_AFTER: float
    PUBLISHER: str
    PUBLISHER_OPTIONS: dict[str, Any]
    DRAIN_BATCH_SIZE: int
    DRAIN_MAX_BYTES: int
    LEASE_SECONDS: float
    MAX_ATTEMPTS: int
    RETRY_BASE_SECONDS: float
    RETRY_MAX_SECONDS: float
    POLL_INTERVAL: float
    NOTIFY: bool
    NOTIFY_CHANNEL: str

    def __getattr__(self, name: str) -> Any:
        if name not in DEFAULTS:
            raise AttributeError(f"RUNS_APP has no setting {name!r}")
        configured = user_settings()
        if isinstance(configured, dict) and name in configured:
            return configured[name]
        return DEFAULTS[name]


runs_settings = RunsAppSettings()
