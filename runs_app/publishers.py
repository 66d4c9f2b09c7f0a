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
import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from django.utils.module_loading import import_string

from .conf import runs_settings
from .exceptions import PublisherError

logger = logging.getLogger("runs_app.publishers")


@dataclass(frozen=True, slots=True)
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
    #: The W3C trace context of the span that created the run (``traceparent``, ``tracestate``),
    #: empty when there was none: see :mod:`runs_app.tracing`.
    trace_context: Mapping[str, str] = field(default_factory=dict)

    def as_cloudevent(self) -> dict[str, Any]:
        """The message as a CloudEvents 1.0 structured-mode event (a JSON-ready dict), with the
        run's trace context as the distributed-tracing extension's attributes when it has one."""
        return {
            **self.trace_context,
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


class KombuPublisher:
    """Publishes to a message broker through kombu (extra ``kombu``: ``pip install
    runs_app[kombu]``): RabbitMQ (``amqp://``), Redis (``redis://``) or any kombu transport.

    Options:
        url: the broker URL, e.g. ``amqp://guest:guest@127.0.0.1:5672//`` or
            ``redis://127.0.0.1:6379/0``.
        exchange: the exchange name (declared durable, once per connection).
        exchange_type: ``topic`` (default), ``direct``, ``fanout`` or ``headers``.
        routing_key: a ``str.format`` template over the message fields ``id``, ``run_id``,
            ``scope``, ``seq`` and ``type``; default ``"{type}"``.
        serializer: a kombu serializer name (default ``json``).
        body: ``cloudevent`` (default: ``Message.as_cloudevent()``) or ``payload`` (the event's
            payload alone; the envelope fields travel in the headers either way).
        connect_timeout: seconds to wait for a connection (default 5).
        publish_timeout: seconds to wait for the broker's confirm of one message (default 30).
        connection_name: shown by the broker (RabbitMQ's connection name, Redis's client name;
            no spaces); default ``runs_app-relay-<host>-<pid>-<n>``.
        transport_options: extra kombu ``transport_options``, merged over ours.

    Each message is persistent (``delivery_mode`` 2, durable exchange) with ``message_id`` =
    ``Message.id`` (the idempotency key) and the headers ``run_id``, ``seq``, ``scope`` and
    ``type``. On AMQP (py-amqp) the channel is in publisher-confirm mode, so ``publish`` returns
    only once the broker has accepted every message. Messages that no queue is bound to are
    dropped by the broker, as for any publisher: bind the consumers' queues first.

    One connection is reused across ``publish`` calls. Any error while connecting or publishing
    drops it (closed quietly) and propagates, so the relay keeps the events pending and backs
    off; the next ``publish`` connects afresh (after a broker restart, for instance). Part of a
    failed batch may have reached the broker: it is published again, in order, on the retry
    (at least once).
    """

    EXCHANGE_TYPES = ("topic", "direct", "fanout", "headers")
    FIELDS = ("id", "run_id", "scope", "seq", "type")
    _names = itertools.count(1)

    def __init__(
        self,
        url: str,
        exchange: str = "runs_app",
        exchange_type: str = "topic",
        routing_key: str = "{type}",
        serializer: str = "json",
        body: Literal["cloudevent", "payload"] = "cloudevent",
        connect_timeout: float = 5.0,
        publish_timeout: float = 30.0,
        connection_name: str | None = None,
        transport_options: Mapping[str, Any] | None = None,
    ) -> None:
        # No connection here: the system check builds publishers too.
        kombu = import_kombu()
        for name, value in (("url", url), ("exchange", exchange)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, not {value!r}")
        if exchange_type not in self.EXCHANGE_TYPES:
            raise ValueError(f"exchange_type must be one of {self.EXCHANGE_TYPES}")
        if body not in ("cloudevent", "payload"):
            raise ValueError(f"body must be 'cloudevent' or 'payload', not {body!r}")
        if not isinstance(routing_key, str):
            raise ValueError(f"routing_key must be a str.format template, not {routing_key!r}")
        try:
            routing_key.format(**dict.fromkeys(self.FIELDS, "x"))
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"routing_key {routing_key!r} is not a template over {self.FIELDS}: {exc!r}"
            ) from None
        try:
            kombu.serialization.dumps({}, serializer=serializer)
        except kombu.exceptions.SerializerNotInstalled as exc:
            raise ValueError(f"serializer {serializer!r}: {exc}") from None
        for name, seconds in (
            ("connect_timeout", connect_timeout),
            ("publish_timeout", publish_timeout),
        ):
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {seconds!r}")
        self._kombu = kombu
        self.url = url
        self.routing_key = routing_key
        self.serializer = serializer
        self.body = body
        self.connect_timeout = float(connect_timeout)
        self.publish_timeout = float(publish_timeout)
        if connection_name is not None and (
            not isinstance(connection_name, str)
            or not connection_name
            or any(char.isspace() for char in connection_name)
        ):
            # Redis refuses client names with spaces.
            raise ValueError(f"connection_name must be a word without spaces: {connection_name!r}")
        self.connection_name = connection_name or (
            f"runs_app-relay-{os.uname().nodename}-{os.getpid()}-{next(self._names)}"
        )
        self.exchange = kombu.Exchange(exchange, type=exchange_type, durable=True)
        self.transport_options = self._transport_options(dict(transport_options or {}))
        self._connection: Any = None
        self._producer: Any = None

    def _transport_options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        driver = self._kombu.Connection(self.url).transport.driver_type
        if driver == "amqp":
            # confirm_publish: py-amqp waits for the broker's ack (or nack, raised) per message.
            options: dict[str, Any] = {
                "confirm_publish": True,
                "client_properties": {"connection_name": self.connection_name},
            }
        elif driver == "redis":
            options = {"client_name": self.connection_name}
        else:
            options = {}
        options.update(overrides)
        return options

    def publish(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        try:
            producer = self._connected_producer()
            for message in messages:
                producer.publish(
                    message.as_cloudevent() if self.body == "cloudevent" else dict(message.payload),
                    routing_key=self.routing_key.format(
                        **{name: getattr(message, name) for name in self.FIELDS}
                    ),
                    message_id=message.id,
                    headers={
                        "run_id": message.run_id,
                        "seq": message.seq,
                        "scope": message.scope,
                        "type": message.type,
                    },
                    delivery_mode=2,
                    # Fail fast: retrying (and its backoff) is the relay's job, not kombu's.
                    retry=False,
                    timeout=self.publish_timeout,
                )
        except Exception:
            # Whatever failed, the connection may be half-dead: start afresh next time.
            self.close()
            raise

    def _connected_producer(self) -> Any:
        if self._producer is None:
            connection = self._kombu.Connection(
                self.url,
                connect_timeout=self.connect_timeout,
                transport_options=self.transport_options,
            )
            self._connection = connection
            # No retries in kombu: a broker that is down fails this publish at once.
            connection.ensure_connection(max_retries=0)
            # auto_declare: the exchange is declared once, when the producer is built.
            self._producer = self._kombu.Producer(
                connection.channel(), exchange=self.exchange, serializer=self.serializer
            )
        return self._producer

    def close(self) -> None:
        """Close the connection, if any (quietly: a broker that dropped it may make this fail)."""
        connection, self._connection, self._producer = self._connection, None, None
        if connection is not None:
            try:
                connection.close()
            except Exception:
                logger.debug("closing the broker connection failed", exc_info=True)


def import_kombu() -> Any:
    """kombu, imported on first use so that ``import runs_app.publishers`` never needs it."""
    try:
        import kombu
        import kombu.exceptions
        import kombu.serialization
    except ImportError as exc:
        raise PublisherError(
            f"{__name__}.KombuPublisher", f"needs kombu ({exc}): pip install runs_app[kombu]"
        ) from exc
    return kombu


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
    except PublisherError:
        raise  # already says what is wrong (a missing extra, for instance)
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
