"""Reading the claimed runs' pending events, as messages, in one query per pass.

Bounded twice: at most ``limit`` events per run, and at most ``max_bytes`` bytes of payload (the
JSON text of each payload) for the whole claim, in claim order (run id, then seq). The read
stops adding events at the first one that would pass the byte budget, but always returns at
least the first event, so a single event larger than the budget is still delivered. A relay's
memory per pass is thus about ``max_bytes`` (plus one event), whatever the batch size and the
payload sizes (``DRAIN_BATCH_SIZE`` runs x ``DRAIN_BATCH_SIZE`` events of 256 KiB would be
about 2.5 GB).
"""

from __future__ import annotations

import json
import json.scanner
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db.models import BigIntegerField, Case, F, Value, When, Window
from django.db.models.expressions import RawSQL
from django.db.models.functions import RowNumber

from ..conf import runs_settings
from ..db import connection_for_write, db_alias, is_postgresql, pg_array, table
from ..models import Run, RunEvent
from ..publishers import Message
from ..tracing import TRACE_CONTEXT_KEYS

# PostgreSQL reads each run's batch with a LATERAL subquery: one index range scan of (run, seq)
# per run, stopping at the batch size whatever the run's backlog, and the run's scope by primary
# key, also LATERAL (its LIMIT 1 keeps the planner from flattening it into a join that may scan
# the run table): a nested loop by construction, whatever the statistics say. A running sum
# over the claim (runs in claim order, then seq) cuts it at the byte budget on the server, so
# what does not fit is never sent: the rows that start within the budget (``upto - size <=``
# it) come back, the one that crosses it without its payload (a marker saying "cut here"); the
# first row always comes whole, and the second comes as a marker when the first alone is over
# the budget. One window, computed as the rows stream (a count over the whole claim would hold
# every row back until the last one). The ORM says neither LATERAL nor a filter over a window.
_READ_POSTGRESQL = """
SELECT run_id, scope, trace_context, seq, type,
    CASE WHEN n = 1 OR upto <= %s THEN payload END AS payload, created_at, n, upto
FROM (
    SELECT c.ord, c.run_id, r.scope, r.trace_context, e.seq, e.type, e.payload,
        e.created_at,
        row_number() OVER w AS n, sum(e.size) OVER w AS upto, e.size
    FROM unnest(%s::text[], %s::bigint[]) WITH ORDINALITY AS c(run_id, next_seq, ord)
    CROSS JOIN LATERAL (SELECT scope, trace_context FROM {run} WHERE id = c.run_id LIMIT 1) r
    CROSS JOIN LATERAL (
        SELECT seq, type, payload, created_at, octet_length(payload::text) AS size
        FROM {event} WHERE run_id = c.run_id AND seq >= c.next_seq
        ORDER BY seq LIMIT %s
    ) e
    WINDOW w AS (ORDER BY c.ord, e.seq ROWS UNBOUNDED PRECEDING)
) t
WHERE n <= 2 OR upto - size <= %s
ORDER BY ord, seq
"""


@dataclass
class Read:
    """What one read returned: the messages keyed by run id (in claim order, each run's in seq
    order), the payload bytes read, and whether the byte budget cut the claim short (the runs
    after the last one present were not read, or that run only in part)."""

    batches: dict[str, list[Message]] = field(default_factory=dict)
    payload_bytes: int = 0
    cut: bool = False


def read_batches(runs: Sequence[tuple[str, int]], limit: int, max_bytes: int | None = None) -> Read:
    """Up to ``limit`` events with ``seq >= next_seq`` of each ``(run_id, next_seq)``, in seq
    order, as messages keyed by run id (runs with nothing pending, or past the byte budget, are
    absent), reading at most ``max_bytes`` bytes of payload in all (default
    ``DRAIN_MAX_BYTES``; at least one event). One query for all runs, outside any transaction:
    committed events below ``Run.last_seq`` never change.

    PostgreSQL: a LATERAL join with the budget cut on the server (raw SQL, see
    ``_READ_POSTGRESQL``). SQLite (no LATERAL): the ORM with ``row_number() OVER (PARTITION BY
    run ORDER BY seq) <= limit`` over the runs' events at or above their cursor (one
    ``CASE run_id`` gives each run its own ``next_seq``), streamed row by row and cut at the
    budget as it goes; it ranks every pending event of those runs, fine at SQLite's scale.
    """
    if not runs:
        return Read()
    runs = sorted(runs)  # claim order: run id
    budget = int(runs_settings.DRAIN_MAX_BYTES) if max_bytes is None else max_bytes
    if is_postgresql():
        rows, used, cut = _read_postgresql(runs, limit, budget)
        return Read(_messages(rows, _decode_json), used, cut)
    rows, used, cut = _within_budget(_read_sqlite(runs, limit), budget)
    return Read(_messages(rows, None), used, cut)  # the ORM decoded the payloads


def _messages(
    rows: Sequence[tuple[Any, ...]], decode: Callable[[str], Any] | None
) -> dict[str, list[Message]]:
    """The rows of a read, in claim order (run id, then seq), as messages keyed by run id. A
    row starts with (run id, scope, trace context, seq, type, payload, created_at); ``decode``
    turns a payload's text into its value (None: it is one already).

    One loop, per event only what must be per event (a second loop and intermediate tuples took
    a tenth of a pass of 100 events per run on PostgreSQL); a run's scope and trace context are
    taken from its first row."""
    batches: dict[str, list[Message]] = {}
    if not rows:
        return batches
    connection = connection_for_write()
    trace_field = Run._meta.get_field("trace_context")
    zone = connection.timezone
    # As Django gives a time on this connection. PostgreSQL's read loads them with psycopg's
    # loader (see _read_postgresql), which labels them with the session's zone: the
    # connection's, but for USE_TZ = False (Django's are naive); SQLite's come from the ORM.
    relabel = rows[0][6].tzinfo is not zone
    batch: list[Message] = []
    current = None
    scope = ""
    trace_context: dict[str, str] = {}
    for run_id, run_scope, trace_text, seq, event_type, data, created_at, *_ in rows:
        if run_id != current:
            current, scope = run_id, run_scope
            trace_context = _trace_context(trace_field, trace_text, connection)
            batch = batches[run_id] = []
        batch.append(
            Message(
                f"{run_id}:{seq}",
                run_id,
                scope,
                seq,
                event_type,
                data if decode is None else decode(data),
                _in_zone(created_at, zone) if relabel else created_at,
                trace_context,
            )
        )
    return batches


def _trace_context(trace_field: Any, text: Any, connection: Any) -> dict[str, str]:
    """A run's stored trace context (the JSON text PostgreSQL's raw read returns, or the value
    the ORM decoded on SQLite), as the headers a message carries ({} when none)."""
    if not text or text == "{}":
        return {}
    value = text if isinstance(text, dict) else trace_field.from_db_value(text, None, connection)
    if not isinstance(value, dict):
        return {}
    return {str(key): str(item) for key, item in value.items() if key in TRACE_CONTEXT_KEYS}


def read_claimed(
    runs: Sequence[tuple[str, int]], limit: int, max_bytes: int | None = None
) -> dict[str, list[Message]]:
    """``read_batches(...).batches``."""
    return read_batches(runs, limit, max_bytes).batches


def read_pending(run_id: str, next_seq: int, limit: int) -> list[Message]:
    """``read_claimed`` for one run."""
    return read_claimed([(run_id, next_seq)], limit).get(run_id, [])


def read_postgresql_query(
    runs: Sequence[tuple[str, int]], limit: int, budget: int
) -> tuple[str, list[Any]]:
    """The PostgreSQL read's statement and parameters (the runs' ids and cursors as array
    literals: :func:`runs_app.db.pg_array`)."""
    sql = _READ_POSTGRESQL.format(run=table(Run), event=table(RunEvent))
    return sql, [
        budget,
        pg_array([run_id for run_id, _ in runs]),
        pg_array([s for _, s in runs]),
        limit,
        budget,
    ]


def _read_postgresql(
    runs: Sequence[tuple[str, int]], limit: int, budget: int
) -> tuple[list[tuple[Any, ...]], int, bool]:
    from psycopg.types.datetime import TimestamptzLoader

    connection = connection_for_write()
    with connection.cursor() as cursor:
        # This cursor reads timestamptz with psycopg's own loader (in C with psycopg's binary
        # or C build), not the Python subclass Django registers on the connection, which
        # parses each value in Python and relabels it: a twentieth of a pass of 100 events per
        # run. Both label a value with the session's zone, the connection's (psycopg maps UTC
        # to datetime.timezone.utc, as Django does); where they differ (USE_TZ = False: Django
        # gives naive datetimes) _messages converts.
        cursor.cursor.adapters.register_loader("timestamptz", TimestamptzLoader)
        cursor.execute(*read_postgresql_query(runs, limit, budget))
        fetched = cursor.fetchall()
    if not fetched:
        return fetched, 0, False
    *_, n, upto = fetched[-1]
    cut = n > 1 and upto > budget  # the marker: the budget cut the claim here
    if cut:
        fetched.pop()
    return fetched, int(fetched[-1][-1]), cut


def _in_zone(value: datetime, zone: Any) -> datetime:
    """``value`` as Django would give it on this connection: in its zone, or naive (in the
    session's zone) without one."""
    return value.astimezone(zone) if zone is not None else value.replace(tzinfo=None)


# The standard decoder's scanner (the C one where there is one), as json.loads uses it.
# (typeshed types its argument as a scanner; it is the decoder whose settings it reads.)
_scan_json = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]


def _decode_json(text: str) -> Any:
    """A payload's JSON text (Django's jsonb loader keeps it a string) decoded as
    ``JSONField.from_db_value`` does with no decoder, ``json.loads``, at a third of its cost:
    the decoder's scanner called directly, without ``loads``'s checks for bytes, a BOM and
    surrounding whitespace, which PostgreSQL's jsonb output never has. Anything else (a value
    not ending where the text ends) goes through ``json.loads`` and its errors."""
    try:
        value, end = _scan_json(text, 0)
    except StopIteration:  # the scanner's way of saying "no JSON value starts here"
        return json.loads(text)
    return value if end == len(text) else json.loads(text)


def _read_sqlite(
    runs: Sequence[tuple[str, int]], limit: int
) -> Iterable[tuple[str, str, Any, int, str, Any, datetime, int]]:
    rank = Window(RowNumber(), partition_by=[F("run_id")], order_by=F("seq").asc())
    # The stored JSON text's size in bytes: what the budget counts (PostgreSQL counts the same).
    size = RawSQL(f"length(CAST({table(RunEvent)}.payload AS BLOB))", [])
    rows = (
        RunEvent.objects.using(db_alias())
        .filter(
            run_id__in=[run_id for run_id, _ in runs],
            seq__gte=Case(
                *(When(run_id=run_id, then=Value(seq)) for run_id, seq in runs),
                output_field=BigIntegerField(),
            ),
        )
        .annotate(rank=rank, size=size)
        .filter(rank__lte=limit)
        .order_by("run_id", "seq")
        .values_list(
            "run_id",
            "run__scope",
            "run__trace_context",
            "seq",
            "type",
            "payload",
            "created_at",
            "size",
        )
    )
    return rows.iterator(chunk_size=100)  # streamed: the rows past the budget are never read


def _within_budget(
    rows: Iterable[tuple[str, str, Any, int, str, Any, datetime, int]], budget: int
) -> tuple[list[tuple[Any, ...]], int, bool]:
    kept: list[tuple[Any, ...]] = []
    used = 0
    cut = False
    stream = iter(rows)
    try:
        for *row, size in stream:
            if kept and used + int(size or 0) > budget:
                cut = True
                break
            used += int(size or 0)
            kept.append(tuple(row))
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # the rest of the rows stays unread; the cursor is closed now
    return kept, used, cut
