"""Reading the claimed runs' pending events, as messages, in one query per pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.db.models import BigIntegerField, Case, F, Value, When, Window
from django.db.models.functions import RowNumber

from ..db import connection_for_write, db_alias, is_postgresql, table
from ..models import Run, RunEvent
from ..publishers import Message

# PostgreSQL reads each run's batch with a LATERAL subquery: one index range scan of (run, seq)
# per run, stopping at the batch size whatever the run's backlog. The ORM cannot say LATERAL.
_READ_POSTGRESQL = """
SELECT c.run_id, r.scope, e.seq, e.type, e.payload, e.created_at
FROM unnest(%s::text[], %s::bigint[]) AS c(run_id, next_seq)
JOIN {run} r ON r.id = c.run_id
CROSS JOIN LATERAL (
    SELECT seq, type, payload, created_at FROM {event}
    WHERE run_id = c.run_id AND seq >= c.next_seq
    ORDER BY seq LIMIT %s
) e
ORDER BY c.run_id, e.seq
"""


def read_claimed(runs: Sequence[tuple[str, int]], limit: int) -> dict[str, list[Message]]:
    """Up to ``limit`` events with ``seq >= next_seq`` of each ``(run_id, next_seq)``, in seq
    order, as messages keyed by run id (runs with nothing pending are absent). One query for all
    runs, outside any transaction: committed events below ``Run.last_seq`` never change.

    PostgreSQL: a LATERAL join (raw SQL, see ``_READ_POSTGRESQL``). SQLite (no LATERAL): the ORM
    with ``row_number() OVER (PARTITION BY run ORDER BY seq) <= limit`` over the runs' events at
    or above their cursor (one ``CASE run_id`` gives each run its own ``next_seq``); it ranks every
    pending event of those runs, which is fine at SQLite's scale.
    """
    if not runs:
        return {}
    alias = db_alias()
    rows: list[tuple[Any, ...]]
    if is_postgresql():
        connection = connection_for_write()
        payload = RunEvent._meta.get_field("payload")
        with connection.cursor() as cursor:
            cursor.execute(
                _READ_POSTGRESQL.format(run=table(Run), event=table(RunEvent)),
                [[run_id for run_id, _ in runs], [seq for _, seq in runs], limit],
            )
            rows = [
                (
                    run_id,
                    scope,
                    seq,
                    kind,
                    payload.from_db_value(data, payload.cached_col, connection),
                    created,
                )
                for run_id, scope, seq, kind, data, created in cursor.fetchall()
            ]
    else:
        rank = Window(RowNumber(), partition_by=[F("run_id")], order_by=F("seq").asc())
        rows = list(
            RunEvent.objects.using(alias)
            .filter(
                run_id__in=[run_id for run_id, _ in runs],
                seq__gte=Case(
                    *(When(run_id=run_id, then=Value(seq)) for run_id, seq in runs),
                    output_field=BigIntegerField(),
                ),
            )
            .annotate(rank=rank)
            .filter(rank__lte=limit)
            .order_by("run_id", "seq")
            .values_list("run_id", "run__scope", "seq", "type", "payload", "created_at")
        )
    batches: dict[str, list[Message]] = {}
    for run_id, scope, seq, event_type, data, created_at in rows:
        batches.setdefault(run_id, []).append(
            Message(
                id=f"{run_id}:{seq}",
                run_id=run_id,
                scope=scope,
                seq=seq,
                type=event_type,
                payload=data,
                occurred_at=created_at,
            )
        )
    return batches


def read_pending(run_id: str, next_seq: int, limit: int) -> list[Message]:
    """``read_claimed`` for one run."""
    return read_claimed([(run_id, next_seq)], limit).get(run_id, [])
