"""Queries over a tracked model's rows, defined once for the admin, the services and users.

**Seen by the latest run.** A row is *seen by the latest run* when its ``last_seen_run`` is the
newest completed run that flushed the row's model: the newest by ``Run.ordinal`` (creation
order, never clocks) among the runs whose state is ``completed`` and whose ledger line for this
model (``RunModelState`` with ``model = sync_spec(model).label``) says the flush succeeded. For a
model with a scope field the runs are those of the row's scope (``Run.scope`` equal to the row's
scope field); for a whole-table model (``sync_scope = None``), every run that flushed the model.
A ledger line written by a cleanup alone (``flush_status`` not succeeded) is not a flush.

*Not seen by the latest run* is exactly the complement, so the two split the table:

* ``last_seen_run`` NULL (the run that saw the row was deleted, or nothing ever stamped it):
  not seen;
* a row last seen by an older run, a failed run, an active run, or a run of another scope:
  not seen;
* **a scope (or a whole-table model) that no completed run ever flushed: every row is not
  seen.** Nothing vouches for those rows: no completed run has said the source still has them.
  The rows are listed, not judged: nothing here deletes anything, and ``safe_cleanup``'s
  guards refuse on their own terms.

Not seen is not "deletable": ``safe_cleanup`` deletes only rows last seen by an *older run of
the scope*, never NULL-stamped rows, and only after its guards pass. This predicate is the
operator's question "which rows did the newest good run not vouch for?".

The predicate is one ``EXISTS`` over the ledger, correlated with the row's ``last_seen_run_id``
(and scope), with a ``NOT EXISTS`` for a newer completed run: part of the statement that reads
the rows, never a query per row. PostgreSQL plans both as (anti-)semi-joins; SQLite walks the
``(run, model)`` unique index of the ledger and the ``(scope, ordinal)`` index of runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from django.db import models
from django.db.models import Exists, OuterRef

if TYPE_CHECKING:
    from .tracking import TrackedModel

_T = TypeVar("_T", bound="TrackedModel")


def seen_by_latest_run(model: type[TrackedModel]) -> Exists:
    """The predicate "seen by the latest completed run of the row's scope" for ``model``'s
    rows, as an expression to filter on (``~`` negates it; see the module's docstring).

    Usable in ``filter()``, ``exclude()``, ``annotate()`` and ``Count(filter=...)``.
    """
    # Imported here: runs_app.models imports the tracking base, which uses this module.
    from .models import FlushStatus, RunModelState, RunStatus
    from .tracking import sync_spec

    spec = sync_spec(model)
    flushed = RunModelState.objects.filter(
        model=spec.label,
        flush_status=FlushStatus.SUCCEEDED,
        run__state__status=RunStatus.COMPLETED,
    )
    newer = flushed.filter(run__ordinal__gt=OuterRef("run__ordinal"))
    latest = flushed.filter(run_id=OuterRef("last_seen_run_id"))
    if spec.scope is not None:
        newer = newer.filter(run__scope=OuterRef("run__scope"))
        latest = latest.filter(run__scope=OuterRef(spec.scope.attname))
    return Exists(latest.filter(~Exists(newer)))


class TrackedQuerySet(models.QuerySet[_T]):
    """The query set of a tracked model's rows (``TrackedModel``'s default manager)."""

    def seen_by_latest_run(self) -> TrackedQuerySet[_T]:
        """Rows whose ``last_seen_run`` is the latest completed run (of the row's scope) that
        flushed this model. The complement of :meth:`not_seen_by_latest_run`."""
        return self.filter(seen_by_latest_run(self.model))

    def not_seen_by_latest_run(self) -> TrackedQuerySet[_T]:
        """Rows not seen by the latest completed run (of the row's scope) that flushed this
        model: ``last_seen_run`` NULL, an older or unfinished run, or no completed run ever
        flushed the scope (then every row). See the module's docstring."""
        return self.filter(~seen_by_latest_run(self.model))
