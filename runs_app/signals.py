"""Signals sent by runs_app.

``message_published``: sent by :class:`runs_app.publishers.SignalPublisher` once per message,
with ``sender=SignalPublisher`` and ``message=<Message>``. A receiver that raises fails the
publish of that run's batch (the relay retries it later), so receivers must be idempotent.
"""

from __future__ import annotations

from django.dispatch import Signal

message_published = Signal()
