"""Publisher classes named by dotted path in the publisher-loading tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from runs_app.publishers import Message


class Broken:
    """A publisher whose constructor fails (as one connecting eagerly to a dead broker would)."""

    def __init__(self, **options: Any) -> None:
        raise ConnectionError("would have connected")


class NoPublish:
    """Not a publisher: no publish method."""


class WithOptions:
    def __init__(self, url: str) -> None:
        self.url = url

    def publish(self, messages: Sequence[Message]) -> None:
        pass
