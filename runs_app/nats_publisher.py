"""``NatsPublisher``: the relay's messages into a NATS JetStream stream (extra ``nats``).

Configure it with the usual settings::

    RUNS_APP = {
        "PUBLISHER": "runs_app.nats_publisher.NatsPublisher",
        "PUBLISHER_OPTIONS": {"servers": "nats://127.0.0.1:4222", "stream": "RUNS"},
    }

nats-py is asyncio and the relay is synchronous: each publisher instance runs its own private
event loop, made on the first ``publish`` and reused by every later one (never ``asyncio.run``
per message), closed by ``close()``. Call ``publish`` from a thread that is not running an
event loop of its own.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import string
import threading
import time
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, Literal, TypeVar

from . import tracing
from .exceptions import InvalidInput, PublisherError, RunsError
from .publish_metrics import default_relay_name, record_publish
from .publishers import Message

logger = logging.getLogger("runs_app.publishers.nats")

T = TypeVar("T")

FIELDS = ("id", "run_id", "scope", "seq", "type")

#: Characters that cannot appear inside a NATS subject token: the separator and the wildcards.
TOKEN_FORBIDDEN = (".", "*", ">")

DEFAULT_SUBJECT = "runs_app.{scope}.{run_id}.{type}"


class NatsPublishError(RunsError):
    """A publish to JetStream failed; the relay keeps the run's events pending and backs off.

    ``reason``: ``unreachable`` (no server could be reached), ``no_stream`` (no stream captures
    the subject), ``wrong_stream`` (a stream other than the ``stream`` option captured it),
    ``timeout`` (no acknowledgement in ``publish_timeout``) or ``rejected`` (any other error
    from the server or the client)."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(f"NATS {reason}: {message}")


def validate_token(field: str, value: str) -> str:
    """``value`` as one NATS subject token: not empty, no whitespace or control character, none
    of ``.``, ``*``, ``>``. Raises ``InvalidInput`` naming ``field``."""
    limit = "one NATS subject token"
    if not value:
        raise InvalidInput(field, "is empty; a NATS subject token must not be", limit=limit)
    for char in value:
        if char.isspace() or ord(char) < 32 or ord(char) == 127:
            raise InvalidInput(
                field, f"{value!r} contains whitespace or a control character", limit=limit
            )
        if char in TOKEN_FORBIDDEN:
            raise InvalidInput(
                field,
                f"{value!r} contains {char!r}, which NATS reads as a token separator or a wildcard",
                limit=limit,
            )
    return value


def validate_subject(field: str, subject: str) -> str:
    """A publish subject: tokens separated by single dots, each a valid token."""
    for token in subject.split("."):
        validate_token(field, token)
    return subject


def template_fields(template: str) -> tuple[str, ...]:
    """The message fields a subject template uses. Raises ``ValueError`` for a field that is
    not one of ``FIELDS`` or for a format spec or conversion (it could add spaces or dots)."""
    used = []
    for _literal, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if name not in FIELDS:
            raise ValueError(f"subject {template!r}: unknown field {{{name}}}; use {FIELDS}")
        if spec or conversion:
            raise ValueError(f"subject {template!r}: {{{name}}} takes no format spec")
        used.append(name)
    return tuple(used)


class NatsPublisher:
    """Publishes each message to JetStream and returns once the stream has acknowledged it
    (extra ``nats``: ``pip install runs_app[nats]``).

    Options:
        servers: a NATS URL or a list of them (``nats://user:password@host:4222``); default
            ``nats://127.0.0.1:4222``.
        subject: a ``str.format`` template over ``id``, ``run_id``, ``scope``, ``seq`` and
            ``type``; default ``runs_app.{scope}.{run_id}.{type}``. ``{type}`` may span several
            tokens (an event type's dots separate them: ``run.completed``); every other field
            must be one token, so a run whose scope or id contains ``.``, ``*``, ``>`` or
            whitespace cannot be published with a template using it (``InvalidInput``, the
            events stay pending).
        stream: the stream that must capture the subjects (``Nats-Expected-Stream``); None
            (default) accepts any.
        body: ``cloudevent`` (default: ``Message.as_cloudevent()`` as JSON, with the
            ``traceparent``/``tracestate`` extension attributes when there is a trace) or
            ``payload`` (the event's payload alone).
        connect_timeout: seconds per connection attempt (default 5).
        publish_timeout: seconds to wait for the stream's acknowledgement of one message
            (default 10).
        name: the connection's name, shown by the server and used as the ``relay`` label of
            the publish metrics; default ``runs_app-relay-<host>-<pid>-<n>``.
        credentials: path of a ``.creds`` file (NATS decentralised auth), if any.

    Every message carries the header ``Nats-Msg-Id`` = ``Message.id``, so the stream's
    duplicate window absorbs the relay's at-least-once redeliveries (a batch published again
    after a relay died or lost its lease), and ``Runs-App-Run-Id``, ``Runs-App-Seq``,
    ``Runs-App-Scope``, ``Runs-App-Type`` (and ``traceparent`` when there is a trace).

    Messages are published one at a time, each after the previous one's acknowledgement, so a
    run's events enter the stream in seq order even when a publish fails half-way: the retry
    starts again at the first unacknowledged seq, and its already stored predecessors are
    dropped as duplicates.

    Failures raise (the relay keeps the events pending and backs off): an invalid subject
    (``InvalidInput``, before anything is sent), an unreachable server, a missing or wrong
    stream, a timeout (``NatsPublishError``). The connection is dropped after any failure and
    made afresh by the next ``publish``.
    """

    _names = itertools.count(1)

    def __init__(
        self,
        servers: str | Sequence[str] = "nats://127.0.0.1:4222",
        subject: str = DEFAULT_SUBJECT,
        stream: str | None = None,
        body: Literal["cloudevent", "payload"] = "cloudevent",
        connect_timeout: float = 5.0,
        publish_timeout: float = 10.0,
        name: str | None = None,
        credentials: str | None = None,
    ) -> None:
        # No connection and no event loop here: the system check builds publishers too.
        self._nats = import_nats()
        server_list = [servers] if isinstance(servers, str) else servers
        if (
            not isinstance(server_list, Sequence)
            or not server_list
            or not all(isinstance(url, str) and url.strip() for url in server_list)
        ):
            raise ValueError(f"servers must be a URL or a non-empty list of URLs, not {servers!r}")
        if not isinstance(subject, str):
            raise ValueError(f"subject must be a str.format template, not {subject!r}")
        self._fields = template_fields(subject)
        sample = {field: "x" for field in FIELDS}
        try:
            validate_subject("subject", subject.format(**sample))
        except (IndexError, ValueError) as exc:
            raise ValueError(f"subject {subject!r} is not a NATS subject template: {exc}") from None
        if stream is not None:
            if not isinstance(stream, str):
                raise ValueError(f"stream must be a stream name or None, not {stream!r}")
            validate_token("stream", stream)
            if "/" in stream or "\\" in stream:
                raise ValueError(f"stream: {stream!r} must not contain a path separator")
        if body not in ("cloudevent", "payload"):
            raise ValueError(f"body must be 'cloudevent' or 'payload', not {body!r}")
        for option, seconds in (
            ("connect_timeout", connect_timeout),
            ("publish_timeout", publish_timeout),
        ):
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
                raise ValueError(f"{option} must be a positive number of seconds, not {seconds!r}")
        if name is not None and (
            not isinstance(name, str) or not name or any(c.isspace() for c in name)
        ):
            raise ValueError(f"name must be a word without spaces, not {name!r}")
        if credentials is not None and (
            not isinstance(credentials, str) or not os.path.isfile(credentials)
        ):
            raise ValueError(f"credentials must be the path of a .creds file, not {credentials!r}")
        self.servers = [url.strip() for url in server_list]
        self.subject = subject
        self.stream = stream
        self.body = body
        self.connect_timeout = float(connect_timeout)
        self.publish_timeout = float(publish_timeout)
        self.name = name or f"{default_relay_name()}-{next(self._names)}"
        self.credentials = credentials
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._jetstream: Any = None

    # --- subjects and bodies -------------------------------------------------------------

    def subject_of(self, message: Message) -> str:
        """The message's subject. Raises ``InvalidInput`` naming the field whose value cannot
        be part of a NATS subject."""
        values: dict[str, str] = {}
        for field in self._fields:
            value = str(getattr(message, field))
            if field == "type":
                validate_subject("type", value)
            else:
                validate_token(field, value)
            values[field] = value
        return validate_subject("subject", self.subject.format(**values))

    def _body(self, message: Message, trace_context: Mapping[str, str]) -> bytes:
        if self.body == "payload":
            data: Any = dict(message.payload)
        else:
            # The CloudEvents distributed-tracing extension: the attributes sit beside the
            # envelope's own in structured mode.
            data = message.as_cloudevent()
            if trace_context:  # the publish span's context replaces the run's, never mixes
                data = {key: v for key, v in data.items() if key not in tracing.TRACE_CONTEXT_KEYS}
            data.update(trace_context)
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def _headers(self, message: Message, trace_context: Mapping[str, str]) -> dict[str, str]:
        return {
            "Nats-Msg-Id": message.id,
            "Runs-App-Run-Id": message.run_id,
            "Runs-App-Seq": str(message.seq),
            "Runs-App-Scope": message.scope,
            "Runs-App-Type": message.type,
            # The publish span's context (a child of the run's) when there is one, else the
            # run's own.
            **(trace_context or message.trace_context),
        }

    # --- publishing ------------------------------------------------------------------------

    def publish(self, messages: Sequence[Message]) -> None:
        """Publish one run's messages in order; return once the stream acknowledged each."""
        if not messages:
            return
        # Every subject first: a message that cannot be addressed fails the batch before any
        # of it is sent.
        subjects = [self.subject_of(message) for message in messages]
        refuse_inside_a_running_loop()
        with self._lock:
            started = time.perf_counter()
            try:
                with tracing.publish_span(
                    messages, system="nats", destination_template=self.subject
                ) as trace_context:
                    self._run(self._publish(messages, subjects, trace_context))
            except BaseException:
                # Whatever failed, the connection may be half-dead: start afresh next time.
                self._drop_connection()
                record_publish(
                    self.name, messages=0, seconds=time.perf_counter() - started, failed=True
                )
                raise
            record_publish(
                self.name,
                messages=len(messages),
                seconds=time.perf_counter() - started,
                failed=False,
            )

    async def _publish(
        self, messages: Sequence[Message], subjects: Sequence[str], trace: Mapping[str, str]
    ) -> None:
        jetstream = await self._connected()
        errors = self._nats.js.errors
        for message, subject in zip(messages, subjects, strict=True):
            try:
                ack = await jetstream.publish(
                    subject,
                    self._body(message, trace),
                    timeout=self.publish_timeout,
                    stream=self.stream,
                    headers=self._headers(message, trace),
                )
            except errors.NoStreamResponseError:
                raise NatsPublishError(
                    "no_stream",
                    f"no JetStream stream captures subject {subject!r} (message {message.id}); "
                    "create the stream (see docs/nats.md)",
                ) from None
            except errors.APIError as exc:
                wrong = getattr(exc, "err_code", None) == 10060
                raise NatsPublishError(
                    "wrong_stream" if wrong else "rejected",
                    f"subject {subject!r} (message {message.id}): {exc}"
                    + (f"; expected stream {self.stream!r}" if wrong else ""),
                ) from exc
            except (TimeoutError, self._nats.errors.TimeoutError) as exc:
                raise NatsPublishError(
                    "timeout",
                    f"no acknowledgement for message {message.id} on {subject!r} within "
                    f"{self.publish_timeout:g} s",
                ) from exc
            except self._nats.errors.Error as exc:
                raise NatsPublishError(
                    "rejected", f"subject {subject!r} (message {message.id}): {exc!r}"
                ) from exc
            if ack.duplicate:
                logger.debug("%s was in the stream already (duplicate window)", message.id)

    async def _connected(self) -> Any:
        if self._client is not None and self._client.is_connected:
            return self._jetstream
        await self._close_client()
        failures: list[BaseException] = []

        async def on_error(error: Exception) -> None:
            failures.append(error)

        async def on_event() -> None:
            return None

        options: dict[str, Any] = {
            "servers": self.servers,
            "name": self.name,
            "connect_timeout": self.connect_timeout,
            # Fail fast: backing off and retrying is the relay's job, not the client's. (With
            # max_reconnect_attempts=0 nats-py would try the first connection forever.)
            "allow_reconnect": False,
            "max_reconnect_attempts": 1,
            "reconnect_time_wait": 0,
            "error_cb": on_error,
            "disconnected_cb": on_event,
            "closed_cb": on_event,
        }
        if self.credentials is not None:
            options["user_credentials"] = self.credentials
        try:
            client = await self._nats.connect(**options)
        except Exception as exc:
            cause = failures[-1] if failures else exc
            raise NatsPublishError(
                "unreachable", f"cannot connect to {', '.join(self.servers)}: {cause}"
            ) from exc
        self._client = client
        self._jetstream = client.jetstream(timeout=self.publish_timeout)
        return self._jetstream

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coroutine)

    async def _close_client(self) -> None:
        client, self._client, self._jetstream = self._client, None, None
        if client is not None and not client.is_closed:
            try:
                await client.close()
            except Exception:
                logger.debug("closing the NATS connection failed", exc_info=True)

    def _drop_connection(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.run_until_complete(self._close_client())
        else:
            self._client = self._jetstream = None

    def close(self) -> None:
        """Close the connection and the event loop, if any (quietly). A later ``publish``
        makes both afresh."""
        refuse_inside_a_running_loop()
        with self._lock:
            loop, self._loop = self._loop, None
            if loop is None or loop.is_closed():
                self._client = self._jetstream = None
                return
            try:
                loop.run_until_complete(self._close_client())
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()


def refuse_inside_a_running_loop() -> None:
    """Raise ``RuntimeError`` when the calling thread runs an event loop: the publisher's own
    loop cannot run inside it (and blocking it would stall the caller's other tasks)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        "NatsPublisher is synchronous and runs its own event loop: call publish() and close() "
        "from a thread that is not running another loop (e.g. via asyncio.to_thread)"
    )


def import_nats() -> Any:
    """nats-py, imported on first use so that runs_app never needs it otherwise."""
    try:
        import nats
        import nats.errors
        import nats.js.errors
    except ImportError as exc:
        raise PublisherError(
            f"{__name__}.NatsPublisher", f"needs nats-py ({exc}): pip install runs_app[nats]"
        ) from exc
    return nats
