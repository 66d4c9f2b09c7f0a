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

from django.db.models import Model

from ..db import db_alias
from ..exceptions import InvalidInput
from ..models import RunModelState, RunStatus
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
    lines = RunModelState.objects.using(db_alias()).filter(
        model=spec.label,
        cursor__isnull=False,
        run__scope=scope,
        run__state__status=RunStatus.COMPLETED,
    )
    if before_ordinal is not None:
        before = validate_positive_int("before_ordinal", before_ordinal, None)
        lines = lines.filter(run__ordinal__lt=before)
    found = lines.order_by("-run__ordinal").values_list("cursor", "run_id", "cursor_at").first()
    if found is None:
        return SourceState()
    return SourceState(found[0], found[1], found[2])


def encode_cursor(value: Any) -> str:
    """Validate a cursor (any JSON value but null, at most ``CURSOR_MAX_BYTES``) and return its
    JSON text. Raises ``InvalidInput`` naming ``cursor``."""
    if value is None:
        raise InvalidInput("cursor", "is None; leave it out to set no cursor")
    return encode_json_value("cursor", value, limit=CURSOR_MAX_BYTES, limit_name="CURSOR_MAX_BYTES")
