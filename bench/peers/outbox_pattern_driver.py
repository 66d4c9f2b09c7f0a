"""django-outbox-pattern as a peer: saving a ``Published`` row in a transaction is the append
(what its ``@publish`` model decorator does after the model's own save); its ``Producer``
(the ``publish`` command's loop body, ``publish_message_from_database``) is the drain: it
checks for scheduled rows, then in one transaction iterates them FOR UPDATE SKIP LOCKED in
chunks of 200, sends each over STOMP and saves it as succeeded. Run in its own virtualenv by
bench/run.py --peers; see _common.py.

The STOMP connection is replaced by an in-memory no-op (``send`` records nothing, always
connected), and the producer's one-second wait after each call is removed, so the figure is
the relay's database and Python work. It has no aggregate: 100 per run is the same kind of
drain over the same number of messages (said in the note).
"""

from __future__ import annotations

import logging
from importlib.metadata import version
from typing import Any

from _common import Report, Timer, expect, log, parse_args
from _django import scalar, settle, setup

SEED_CHUNK = 50_000


class NoopStomp:
    """Stands in for stomp.StompConnection12: connected, sends nowhere."""

    def __init__(self) -> None:
        self.sent = 0

    def is_connected(self) -> bool:
        return True

    def connect(self, *args: Any, **kwargs: Any) -> None:
        return None

    def disconnect(self, *args: Any, **kwargs: Any) -> None:
        return None

    def send(self, *args: Any, **kwargs: Any) -> None:
        self.sent += 1


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.ERROR)
    setup(args.database_url, ["django_outbox_pattern"])
    from django.db import connection, transaction
    from django_outbox_pattern.models import Published
    from django_outbox_pattern.producers import Producer

    report = Report("django-outbox-pattern", version("django-outbox-pattern"), args)

    def reset() -> None:
        with connection.cursor() as cursor:
            cursor.execute("TRUNCATE published")
        settle("published")

    def enqueue() -> float:
        reset()
        with Timer() as timer:
            for n in range(args.enqueue):
                with transaction.atomic():
                    Published(destination="/topic/bench", body={"n": n, "source": "bench"}).save()
        expect("rows", scalar("SELECT count(*) FROM published"), args.enqueue)
        return args.enqueue / timer.seconds

    def drain(total: int) -> float:
        reset()
        # Untimed: one row through the API, copied set-based with fresh ids.
        with transaction.atomic():
            Published(destination="/topic/bench", body={"n": 0, "source": "bench"}).save()
        with connection.cursor() as cursor:
            for start in range(1, total, SEED_CHUNK):
                cursor.execute(
                    """
                    INSERT INTO published (id, version, destination, body, added, expires_at,
                        retry, status, headers)
                    SELECT gen_random_uuid(), t.version, t.destination,
                        jsonb_build_object('n', g, 'source', 'bench'), now(), t.expires_at,
                        0, t.status, t.headers
                    FROM (SELECT * FROM published LIMIT 1) t, generate_series(%s, %s) g
                    """,
                    (start, min(total, start + SEED_CHUNK) - 1),
                )
        expect("rows seeded", scalar("SELECT count(*) FROM published"), total)
        settle("published")
        stomp = NoopStomp()
        producer = Producer(stomp, "guest", "guest")
        producer._waiting = lambda: None  # type: ignore[method-assign]
        with Timer() as timer:
            while scalar("SELECT 1 FROM published WHERE status = 1 LIMIT 1"):
                producer.publish_message_from_database()
        expect("messages sent", stomp.sent, total)
        return total / timer.seconds

    report.measure("append_1", args.rounds, enqueue)
    report.measure("drain_per_run", args.rounds, lambda: drain(args.per_run_runs), "no aggregates")
    report.measure(
        "drain_1",
        args.rounds,
        lambda: drain(args.drain_runs * args.drain_per_run),
        "no aggregates: the same messages, no per-run order",
    )
    log("done")


if __name__ == "__main__":
    main()
