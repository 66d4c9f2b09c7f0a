"""django-celery-outbox as a peer: ``OutboxCelery.send_task`` inside a transaction writes one
``celery_outbox`` row (the append); its ``Relay`` selects up to ``batch_size`` rows FOR UPDATE
SKIP LOCKED, marks them in flight, publishes each with Celery, then deletes the published rows
(the drain). Run in its own virtualenv by bench/run.py --peers; see _common.py.

The publisher is the relay's own (options deserialised, headers built, one call per message)
with Celery's ``send_task`` replaced by a no-op, as runs_app's harness publishes to a no-op.
The relay's pass is ``Relay._processing()`` (what ``celery_outbox_relay`` loops on), with
``idle_time=0`` so an empty batch does not sleep, until the table is empty. It has no
aggregate: 100 per run is the same kind of drain over the same number of messages (said in
the note).
"""

from __future__ import annotations

import logging
import os
import sys
from importlib.metadata import version
from typing import Any

from _common import Report, Timer, expect, log, parse_args
from _django import scalar, settle, setup

SEED_CHUNK = 50_000


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.ERROR)
    sys.modules.setdefault("bench_celery_outbox_app", sys.modules[__name__])
    setup(
        args.database_url,
        ["django_celery_outbox"],
        CELERY_OUTBOX_APP="bench_celery_outbox_app.APP",
    )
    import structlog
    from django.db import connection, transaction
    from django_celery_outbox import OutboxCelery
    from django_celery_outbox.relay import Relay, RelayConfig

    # Quiet structlog's per-batch info lines (printed to stdout by default).
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    app = OutboxCelery("bench", broker="memory://", set_as_current=True)
    globals()["APP"] = app
    report = Report("django-celery-outbox", version("django-celery-outbox"), args)

    def reset() -> None:
        with connection.cursor() as cursor:
            cursor.execute("TRUNCATE celery_outbox, celery_outbox_dead_letter RESTART IDENTITY")
        settle("celery_outbox")

    def enqueue() -> float:
        reset()
        with Timer() as timer:
            for n in range(args.enqueue):
                with transaction.atomic():
                    app.send_task("bench.event", kwargs={"n": n, "source": "bench"})
        expect("rows", scalar("SELECT count(*) FROM celery_outbox"), args.enqueue)
        return args.enqueue / timer.seconds

    def drain(total: int) -> float:
        reset()
        # Untimed: one row through the API, copied set-based with fresh task ids.
        with transaction.atomic():
            app.send_task("bench.event", kwargs={"n": 0, "source": "bench"})
        with connection.cursor() as cursor:
            for start in range(1, total, SEED_CHUNK):
                cursor.execute(
                    """
                    INSERT INTO celery_outbox (created_at, updated_at, retries, retry_after,
                        task_id, task_name, args, kwargs, redacted_args, redacted_kwargs,
                        options, sentry_trace_id, sentry_baggage, structlog_context,
                        schema_version)
                    SELECT now(), NULL, 0, NULL, gen_random_uuid()::text, t.task_name, t.args,
                        jsonb_build_object('n', g, 'source', 'bench'), NULL, NULL, t.options,
                        t.sentry_trace_id, t.sentry_baggage, t.structlog_context,
                        t.schema_version
                    FROM (SELECT * FROM celery_outbox ORDER BY id LIMIT 1) t,
                        generate_series(%s, %s) g
                    """,
                    (start, min(total, start + SEED_CHUNK) - 1),
                )
        expect("rows seeded", scalar("SELECT count(*) FROM celery_outbox"), total)
        settle("celery_outbox")
        relay = Relay(app, RelayConfig.init(batch_size=100, idle_time=0))
        published = 0

        def noop(call: Any) -> None:
            nonlocal published
            published += 1

        relay._publisher.publish_prepared = noop  # type: ignore[method-assign]
        with Timer() as timer:
            while scalar("SELECT 1 FROM celery_outbox LIMIT 1"):
                relay._processing()
        expect("messages published", published, total)
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
    os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    main()
