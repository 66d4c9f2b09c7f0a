"""The NATS side of the NatsPublisher tests: a synchronous JetStream admin and consumer.

Every test makes its own stream over its own subject prefix (deleted afterwards) on the
machine's NATS server (127.0.0.1:4222, JetStream on). A server that is down fails these tests,
it never skips them: ``scripts/ensure-nats`` starts it in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
from nats.js.api import StreamConfig

from runs_app.nats_publisher import NatsPublisher
from runs_app.publishers import Message

NATS_URL = "nats://127.0.0.1:4222"

T = TypeVar("T")


@dataclass(frozen=True)
class Stored:
    """One message as a consumer reads it from the stream."""

    subject: str
    headers: dict[str, str]
    body: Any
    stream_seq: int

    @property
    def run_seq(self) -> tuple[str, int]:
        return self.headers["Runs-App-Run-Id"], int(self.headers["Runs-App-Seq"])


class JetStreamAdmin:
    """A test's stream: created on ``create()``, read with ``read()``, deleted on ``delete()``.
    Runs its own event loop (the tests are synchronous, like the relay)."""

    def __init__(self, duplicate_window: float = 120.0) -> None:
        tag = uuid.uuid4().hex[:10]
        self.name = f"RUNS_TEST_{tag}"
        self.prefix = f"rt{tag}"
        self.subject = f"{self.prefix}.{{scope}}.{{run_id}}.{{type}}"
        self.duplicate_window = duplicate_window
        self.loop = asyncio.new_event_loop()
        self.client: Any = self.run(nats.connect(NATS_URL, connect_timeout=5))
        self.js = self.client.jetstream(timeout=10)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def create(self) -> None:
        self.run(
            self.js.add_stream(
                StreamConfig(
                    name=self.name,
                    subjects=[f"{self.prefix}.>"],
                    duplicate_window=self.duplicate_window,
                )
            )
        )

    def count(self) -> int:
        info = self.run(self.js.stream_info(self.name))
        return int(info.state.messages)

    def read(self, count: int, timeout: float = 20) -> list[Stored]:
        """Every message of the stream in stream order, once at least ``count`` are stored;
        fails after ``timeout`` seconds. An ephemeral consumer reads them from the start."""
        deadline = time.monotonic() + timeout
        while self.count() < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"the stream holds {self.count()} of {count} messages")
            time.sleep(0.02)  # polling interval of the wait, not a synchronisation by itself
        return self.run(self._read_all())

    async def _read_all(self) -> list[Stored]:
        total = (await self.js.stream_info(self.name)).state.messages
        subscription = await self.js.pull_subscribe(f"{self.prefix}.>", stream=self.name)
        stored: list[Stored] = []
        try:
            while len(stored) < total:
                for message in await subscription.fetch(min(256, total - len(stored)), timeout=10):
                    await message.ack()
                    stored.append(
                        Stored(
                            message.subject,
                            dict(message.headers or {}),
                            json.loads(message.data),
                            message.metadata.sequence.stream,
                        )
                    )
        finally:
            await subscription.unsubscribe()
        return stored

    def delete(self) -> None:
        try:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                self.run(self.js.delete_stream(self.name))
            self.run(self.client.close())
        finally:
            self.loop.close()


class SlowNatsPublisher(NatsPublisher):
    """A ``NatsPublisher`` that waits ``delay`` seconds after each message (a slow broker, not a
    synchronisation), so that a relay killed by a test dies in the middle of a batch."""

    def __init__(self, delay: float = 0.0, **options: Any) -> None:
        super().__init__(**options)
        self.delay = delay

    def publish(self, messages: Sequence[Message]) -> None:
        for message in messages:
            super().publish([message])
            time.sleep(self.delay)
