"""Incremental source state: the cursor a job resumes its source from.

A run reading its source incrementally (``services.flush(run, Model, incremental=True)``) starts
from the cursor of the newest *completed* run of its scope that set one for the model, and sets
its own with the rows it belongs to (``flush.write(page, cursor=...)``: stored in the transaction
of that write's last batch). The run's cursor becomes the scope's state only when the run
completes: nothing is copied or promoted, the read below simply never looks at an active or
failed run. A failed run's cursor therefore never becomes a starting point, and a run whose
flush failed or was cut off cannot complete (``complete_run``), so the state only ever moves to
a cursor whose rows are all committed.

The cursor is the job's own JSON value (a timestamp, an id, a page token, an object of several):
runs_app stores it, never interprets it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from django.db import connections
from django.db.models import Model

from ..conf import runs_settings
from ..db import db_alias, is_postgresql, table
from ..exceptions import InvalidInput
from ..models import Run, RunModelState, RunState, RunStatus
from ..tracking import tracked_spec
from .validation import encode_json_value, validate_positive_int, validate_scope

#: The largest cursor, in bytes of JSON: a cursor is a position in a source, not data. It travels
#: in the ``<sync_name>.flushed`` event of the batch that set it.
CURSOR_MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class SourceState:
    """Where a scope's source stands for a tracked model: the cursor of the newest completed
    run that set one (``cursor``; None when no completed run did), that run's id and when the
    cursor was written."""

    cursor: Any = None
    run_id: str | None = None
    set_at: dt.datetime | None = None


def source_state(
    scope: str, model: type[Model], *, before_ordinal: int | None = None
) -> SourceState:
    """The source state of ``scope`` for the tracked ``model``: what the next incremental run
    of the scope starts from. ``before_ordinal``: only runs created before that one (a run's own
    starting point; a positive integer, else ``InvalidInput``). Reads only.

    To read a source incrementally, open the flush with ``incremental=True`` and use the
    session's ``cursor``: that is what marks the run incremental, so that its cleanup is
    refused (a run that read only what changed cannot tell which rows are gone).
    """
    spec = tracked_spec(model)
    scope = validate_scope(scope)
    before: int | None = None
    if before_ordinal is not None:
        before = validate_positive_int("before_ordinal", before_ordinal, None)
    if is_postgresql():
        return _source_state_postgresql(scope, spec.label, before)
    lines = RunModelState.objects.using(db_alias()).filter(
        model=spec.label,
        cursor__isnull=False,
        run__scope=scope,
        run__state__status=RunStatus.COMPLETED,
    )
    if before is not None:
        lines = lines.filter(run__ordinal__lt=before)
    found = lines.order_by("-run__ordinal").values_list("cursor", "run_id", "cursor_at").first()
    if found is None:
        return SourceState()
    return SourceState(found[0], found[1], found[2])


# PostgreSQL walks the scope's runs newest first, one step of the (scope, ordinal) index at a
# time (max(ordinal) below the previous one: a backward probe of that index), and looks at each
# run's line of the model (by the (run, model) unique key) and state, until one is completed and
# has a cursor: the recursion runs only as far as the LIMIT pulls it. Written so because the
# join the ORM writes was planned from statistics: on a fresh database (none yet) it read every
# run of the scope and sorted them (0.6 s at 50,000 runs) instead of walking back from the
# newest. The walk costs the runs since the last completed one with a cursor.
_SOURCE_STATE_POSTGRESQL = """
WITH RECURSIVE walk(ordinal) AS (
    SELECT (SELECT max(ordinal) FROM {run} WHERE scope = %(scope)s AND ordinal < %(before)s)
    UNION ALL
    SELECT (SELECT max(r.ordinal) FROM {run} r WHERE r.scope = %(scope)s AND r.ordinal < w.ordinal)
    FROM walk w WHERE w.ordinal IS NOT NULL
)
SELECT found.cursor, found.run_id, found.cursor_at FROM walk w CROSS JOIN LATERAL (
    SELECT m.cursor, m.run_id, m.cursor_at FROM {run} r
    JOIN {line} m ON m.run_id = r.id AND m.model = %(model)s
    JOIN {state} s ON s.run_id = r.id
    WHERE r.ordinal = w.ordinal AND m.cursor IS NOT NULL AND s.status = %(completed)s
    LIMIT 1
) found
WHERE w.ordinal IS NOT NULL
LIMIT 1
"""

#: Above every ordinal (a bigint): ``before_ordinal=None``, or a larger one given.
_NO_ORDINAL_ABOVE = 2**63 - 1


def _source_state_postgresql(scope: str, label: str, before: int | None) -> SourceState:
    sql = _SOURCE_STATE_POSTGRESQL.format(
        run=table(Run), line=table(RunModelState), state=table(RunState)
    )
    params: dict[str, Any] = {
        "scope": scope,
        "model": label,
        "before": _NO_ORDINAL_ABOVE if before is None else min(before, _NO_ORDINAL_ABOVE),
        "completed": RunStatus.COMPLETED.value,
    }
    connection = connections[db_alias()]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        found = cursor.fetchone()
    if found is None:
        return SourceState()
    cursor_field: Any = RunModelState._meta.get_field("cursor")
    value = cursor_field.from_db_value(found[0], None, connection)
    return SourceState(value, found[1], found[2])


def cursor_limit() -> int:
    """The largest cursor, in bytes of JSON: ``CURSOR_MAX_BYTES``, or half of
    ``MAX_PAYLOAD_BYTES`` when that is smaller (the cursor travels in an event's payload)."""
    return min(CURSOR_MAX_BYTES, int(runs_settings.MAX_PAYLOAD_BYTES) // 2)


def encode_cursor(value: Any) -> str:
    """Validate a cursor (any JSON value but null, at most ``cursor_limit()`` bytes) and return
    its JSON text. Raises ``InvalidInput`` naming ``cursor``."""
    if value is None:
        raise InvalidInput("cursor", "is None; leave it out to set no cursor")
    limit = cursor_limit()
    name = (
        "CURSOR_MAX_BYTES"
        if limit == CURSOR_MAX_BYTES
        else "half of RUNS_APP['MAX_PAYLOAD_BYTES']: the cursor travels in an event"
    )
    return encode_json_value("cursor", value, limit=limit, limit_name=name)
