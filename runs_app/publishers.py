"""Messages and publishers: what the relay hands over, and to whom.

A publisher is any object with ``publish(messages: Sequence[Message]) -> None`` that raises to
signal failure (and, optionally, ``close()``). The relay calls ``publish`` with the messages of
one run, in seq order, outside any transaction; when it returns, the messages count as delivered.
The configured one is ``RUNS_APP["PUBLISHER"]`` built as ``Class(**RUNS_APP["PUBLISHER_OPTIONS"])``.

This module touches no model and no database: :mod:`runs_app.testing` imports it before Django is
set up.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from django.utils.module_loading import import_string

from .conf import runs_settings
from .exceptions import PublisherError

logger = logging.getLogger("runs_app.publishers")


@dataclass(frozen=True)
class Message:
    """One event on its way out. ``id`` (``"<run_id>:<seq>"``) is the idempotency key: a
    consumer that remembers the ids it has seen turns at-least-once delivery into exactly-once
    processing."""

    id: str
    run_id: str
    scope: str
    seq: int
    type: str
    payload: Mapping[str, Any]
    occurred_at: dt.datetime

    def as_cloudevent(self) -> dict[str, Any]:
        """The message as a CloudEvents 1.0 structured-mode event (a JSON-ready dict)."""
        return {
            "specversion": "1.0",
            "id": self.id,
            "source": f"/runs_app/{self.scope}",
            "type": self.type,
            "subject": self.run_id,
            "time": rfc3339(self.occurred_at),
            "datacontenttype": "application/json",
            # A copy: whoever serialises or decorates the envelope cannot change the message.
            "data": copy.deepcopy(dict(self.payload)),
        }


def rfc3339(moment: dt.datetime) -> str:
    """UTC, with a ``Z``: ``2025-01-31T12:00:00.123456Z``. A naive datetime is taken as UTC
    (what Django stores with ``USE_TZ = True``)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


@runtime_checkable
class Publisher(Protocol):
    """What the relay needs. ``publish`` gets one run's messages in seq order; it returns when
    they are delivered and raises (any ``Exception``) when they are not: the relay then keeps
    them pending and retries that run after a backoff. Connect lazily, in ``publish``, not in
    ``__init__``: the system check builds the class to validate the settings."""

    def publish(self, messages: Sequence[Message]) -> None: ...


class LoggingPublisher:
    """The default: one log line per message on the ``runs_app.publishers`` logger.

    ``level`` is a logging level name or number (default ``INFO``).
    """

    def __init__(self, level: int | str = logging.INFO) -> None:
        resolved = logging.getLevelName(level) if isinstance(level, str) else level
        if not isinstance(resolved, int):
            raise ValueError(f"unknown logging level {level!r}")
        self.level = resolved

    def publish(self, messages: Sequence[Message]) -> None:
        for message in messages:
            logger.log(
                self.level,
                "published %s %s (scope %s) %s",
                message.id,
                message.type,
                message.scope,
                message.payload,
            )


class SignalPublisher:
    """Sends ``runs_app.signals.message_published`` once per message, for in-process consumers.

    ``send`` (not ``send_robust``): a receiver that raises fails the batch, so it is retried.
    """

    def publish(self, messages: Sequence[Message]) -> None:
        from .signals import message_published

        for message in messages:
            message_published.send(sender=SignalPublisher, message=message)


def load_publisher(path: str | None = None, options: Mapping[str, Any] | None = None) -> Publisher:
    """Build the configured publisher (or ``path`` with ``options``).

    Raises ``PublisherError`` when the path cannot be imported, the class cannot be built with
    the options, or the object it builds has no ``publish`` method.
    """
    path = runs_settings.PUBLISHER if path is None else path
    options = runs_settings.PUBLISHER_OPTIONS if options is None else options
    if not isinstance(path, str):
        raise PublisherError(repr(path), "PUBLISHER must be a dotted import path")
    if not isinstance(options, Mapping):
        raise PublisherError(path, "PUBLISHER_OPTIONS must be a dict of keyword arguments")
    try:
        factory = import_string(path)
    except ImportError as exc:
        raise PublisherError(path, f"cannot be imported ({exc})") from exc
    if not callable(factory):
        raise PublisherError(path, "is not a class or a callable")
    try:
        publisher = factory(**options)
    except Exception as exc:
        raise PublisherError(
            path, f"cannot be built with PUBLISHER_OPTIONS ({type(exc).__name__}: {exc})"
        ) from exc
    if not callable(getattr(publisher, "publish", None)):
        raise PublisherError(path, "builds an object without a publish(messages) method")
    return publisher  # type: ignore[no-any-return]


def close_publisher(publisher: object) -> None:
    """Call the publisher's optional ``close()``."""
    close = getattr(publisher, "close", None)
    if callable(close):
        close()
