"""Tracked models: any model of a project, synced by runs.

A model inherits :class:`TrackedModel` and declares its **sync key** (``sync_key``: one or more
of its own fields, covered, with the scope field, by a unique constraint) and its **scope**
(``sync_scope``: a text field that holds the run's scope, or None: the whole table is one
scope). The base adds the run stamps and timestamps that flush, completion and cleanup keep::

    class Repository(TrackedModel):
        github_id = models.BigIntegerField(unique=True)
        name = models.CharField(max_length=200)
        owner = models.ForeignKey(Owner, on_delete=models.PROTECT)

        sync_key = ("github_id",)

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

:func:`sync_spec` reads the declaration once per model; the system checks
(``runs_app.E030`` to ``E034``) refuse a declaration the services could not honour.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar, TypeVar

from django.apps import apps
from django.core import checks
from django.db import models
from django.db.models import Exists, Field, OuterRef
from django.utils import timezone

from .conf import MAX_GRACE_RUNS
from .exceptions import InvalidInput
from .statuses import CleanupMode, FlushStatus, RunStatus

#: The fields the base adds; a model's own field of one of these names is refused (E033).
STAMPS = ("last_seen_run", "last_confirmed_run", "created_at", "updated_at")

#: The tombstone a soft-deleting model carries (``SoftDeleteTrackedModel``), set by cleanup.
TOMBSTONE = ("deleted_at", "deleted_by_run", "deleted_reason")

#: Fields a scope may be held in: the run's scope is a string.
SCOPE_FIELD_TYPES = (models.CharField, models.TextField)


_T = TypeVar("_T", bound="TrackedModel")


def seen_by_latest_run(model: type[TrackedModel]) -> Exists:
    """The predicate "seen by the latest completed run of the row's scope" for ``model``'s
    rows, as an expression to filter on (``~`` negates it; see the module's docstring).

    Usable in ``filter()``, ``exclude()``, ``annotate()`` and ``Count(filter=...)``.
    """
    # Through the registry: runs_app.models imports this module (for the base).
    RunModelState = apps.get_model("runs_app", "RunModelState")
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

    def live(self) -> TrackedQuerySet[_T]:
        """Rows without a tombstone: for a soft-deleting model, those whose ``deleted_at`` is
        NULL; for a deleting model, every row (cleanup deletes the others)."""
        if sync_spec(self.model).soft:
            return self.filter(deleted_at__isnull=True)
        return self.all()

    def tombstoned(self) -> TrackedQuerySet[_T]:
        """Rows a soft cleanup tombstoned (and no flush revived since); none for a deleting
        model."""
        if sync_spec(self.model).soft:
            return self.filter(deleted_at__isnull=False)
        return self.none()


class LiveTrackedManager(models.Manager[_T]):
    """A manager that hides tombstoned rows, for a project that wants ``objects`` to: declare
    ``objects = LiveTrackedManager()`` and keep ``all_objects = TrackedQuerySet.as_manager()``
    for the rest. runs_app's services never use it: they read through ``_base_manager``."""

    def get_queryset(self) -> TrackedQuerySet[_T]:
        return TrackedQuerySet(self.model, using=self._db).live()


class TrackedModel(models.Model):
    """Abstract base of a model synced by runs (see the module's docstring).

    Class attributes (the declaration):
      * ``sync_key``: names of the fields that identify a row in the source.
      * ``sync_scope``: name of the text field holding the run's scope (set by the flush from
        the run, never by the rows), or None (default): the whole table is one scope.
      * ``sync_fields``: the fields the source owns (written by every flush: a field a row
        leaves out gets its default); None (default): every field of the model but the
        automatic primary key, the scope, the stamps and ``auto_now_add`` times. Other fields
        are the project's own: a flush inserts them as ``create()`` would (their default, the
        time for ``auto_now``/``auto_now_add``, the database's ``db_default``) and never
        updates them.
      * ``sync_name``: how events and errors call these rows (``<sync_name>.flushed``,
        ``<sync_name>[i].field``); None (default): events are named after the model's label
        (``app_label.model_name.flushed``) and errors say ``rows[i].field``.
      * ``sync_cleanup``: ``"delete"`` (default): cleanup deletes the rows a run did not see;
        ``"soft"``: it sets their tombstone instead (inherit :class:`SoftDeleteTrackedModel`,
        which declares it and adds the tombstone fields).
      * ``sync_grace_runs``: cleanup removes only the rows that the last N consecutive
        completed runs of the scope that flushed the model all missed; None (default): the
        ``CLEANUP_GRACE_RUNS`` setting (default 1: the cleaning run alone).
    """

    sync_key: ClassVar[tuple[str, ...]] = ()
    sync_scope: ClassVar[str | None] = None
    sync_fields: ClassVar[tuple[str, ...] | None] = None
    sync_name: ClassVar[str | None] = None
    sync_cleanup: ClassVar[str] = CleanupMode.DELETE
    sync_grace_runs: ClassVar[int | None] = None

    # SET_NULL: deleting a run never deletes rows. No reverse accessor: a run is not the
    # place to list every tracked model's rows.
    last_seen_run = models.ForeignKey(
        "runs_app.Run", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    last_confirmed_run = models.ForeignKey(
        "runs_app.Run", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now)

    objects = TrackedQuerySet.as_manager()

    class Meta:
        abstract = True

    @classmethod
    def check(cls, **kwargs: Any) -> list[checks.CheckMessage]:
        errors = super().check(**kwargs)
        if not cls._meta.abstract:
            errors.extend(check_declaration(cls))
        return errors


class SoftDeleteTrackedModel(TrackedModel):
    """Abstract base of a tracked model whose cleanup tombstones rows instead of deleting them
    (``sync_cleanup = "soft"``). A tombstoned row keeps every column; a flush that lists its key
    again revives it (clears the tombstone, counted as ``revived``). The default manager still
    returns tombstoned rows: filter with ``.live()`` (or declare ``LiveTrackedManager``)."""

    sync_cleanup: ClassVar[str] = CleanupMode.SOFT

    deleted_at = models.DateTimeField(null=True, blank=True, db_index=True)
    deleted_by_run = models.ForeignKey(
        "runs_app.Run", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    deleted_reason = models.CharField(max_length=32, blank=True, default="", db_default="")

    class Meta:
        abstract = True


@dataclass(frozen=True)
class SyncSpec:
    """A tracked model's declaration, resolved to fields (see :class:`TrackedModel`)."""

    model: type[TrackedModel]
    label: str  # "app_label.model_name", as stored in the ledgers
    key: tuple[Field[Any, Any], ...]
    scope: Field[Any, Any] | None
    owned: tuple[Field[Any, Any], ...]  # what rows may set, key fields first
    defaulted: tuple[Field[Any, Any], ...]  # inserted with their default, never updated
    rows_name: str  # "rows" or sync_name, in error messages
    event_prefix: str  # events "<prefix>.flushed", "<prefix>.removed"
    soft: bool = False  # sync_cleanup == "soft": cleanup sets the tombstone
    grace_runs: int | None = None  # sync_grace_runs; None: the setting

    @property
    def key_names(self) -> tuple[str, ...]:
        return tuple(field.name for field in self.key)


def model_label(model: type[models.Model]) -> str:
    return f"{model._meta.app_label}.{model._meta.model_name}"


def is_tracked(model: Any) -> bool:
    return (
        isinstance(model, type)
        and issubclass(model, TrackedModel)
        and not model._meta.abstract
        and not model._meta.proxy
    )


def _is_automatic(field: Field[Any, Any]) -> bool:
    return bool(field.primary_key and isinstance(field, models.AutoField))


def _syncable(model: type[models.Model]) -> list[Field[Any, Any]]:
    """The model's own columns: concrete, stored, not the automatic primary key, not a stamp."""
    return [
        field
        for field in model._meta.concrete_fields
        if not _is_automatic(field)
        and field.name not in STAMPS
        and not (field.name in TOMBSTONE and is_soft(model))
        and not getattr(field, "generated", False)
    ]


def sync_spec(model: type[models.Model]) -> SyncSpec:
    """The resolved declaration of a tracked model. Assumes it passed the system checks."""
    return _sync_spec(model)


@cache
def _sync_spec(model: Any) -> SyncSpec:
    meta = model._meta
    fields = {field.name: field for field in meta.concrete_fields}
    key = tuple(fields[name] for name in model.sync_key)
    scope = fields[model.sync_scope] if model.sync_scope else None
    syncable = [field for field in _syncable(model) if field is not scope]
    if model.sync_fields is None:
        # An auto_now_add time is the project's bookkeeping, set once when the row is created.
        owned_names = {f.name for f in syncable if not getattr(f, "auto_now_add", False)}
    else:
        owned_names = set(model.sync_fields) | set(model.sync_key)
    owned = key + tuple(f for f in syncable if f.name in owned_names and f not in key)
    defaulted = tuple(f for f in syncable if f.name not in owned_names)
    label = model_label(model)
    return SyncSpec(
        model=model,
        label=label,
        key=key,
        scope=scope,
        owned=owned,
        defaulted=defaulted,
        rows_name=model.sync_name or "rows",
        event_prefix=model.sync_name or label,
        soft=is_soft(model),
        grace_runs=model.sync_grace_runs,
    )


def is_soft(model: Any) -> bool:
    """Does ``model`` declare soft cleanup (``sync_cleanup = "soft"``)?"""
    return getattr(model, "sync_cleanup", CleanupMode.DELETE) == CleanupMode.SOFT


def tracked_spec(model: Any) -> SyncSpec:
    """The declaration of ``model``; ``InvalidInput`` if it is not a concrete ``TrackedModel``."""
    if not is_tracked(model):
        name = getattr(model, "__name__", repr(model))
        raise InvalidInput(
            "model", f"{name} is not a tracked model: it must be a concrete TrackedModel subclass"
        )
    return sync_spec(model)


def json_key(key: tuple[Any, ...]) -> Any:
    """A row's key as event payloads and plans show it: the value of a one-field key, else a
    list; values JSON has no type for (a UUID, a date...) as text."""
    values = [value if isinstance(value, str | int | float) else str(value) for value in key]
    return values[0] if len(values) == 1 else values


def _unique_sets(model: type[models.Model]) -> list[frozenset[str]]:
    meta = model._meta
    sets = [frozenset(c.fields) for c in meta.total_unique_constraints]
    sets += [frozenset(fields) for fields in meta.unique_together]
    sets += [frozenset({f.name}) for f in meta.concrete_fields if f.unique]
    return sets


def check_declaration(model: type[TrackedModel]) -> list[checks.CheckMessage]:
    """The checks of a tracked model's declaration (ids ``runs_app.E030`` to ``E036``)."""
    errors: list[checks.CheckMessage] = _check_cleanup_declaration(model)
    meta = model._meta
    names = {field.name for field in meta.get_fields()}
    label = model_label(model)

    for stamp in STAMPS:
        field = meta.get_field(stamp) if stamp in names else None
        if field is None or not _is_stamp(stamp, field):
            errors.append(
                checks.Error(
                    f"{label} defines its own field {stamp!r}, which TrackedModel keeps",
                    hint=f"Rename the field: {', '.join(STAMPS)} are the run stamps.",
                    obj=model,
                    id="runs_app.E033",
                )
            )

    key = model.sync_key
    if isinstance(key, str) or not isinstance(key, (tuple, list)) or not key:
        errors.append(
            checks.Error(
                f"{label}.sync_key must be a non-empty tuple of field names, not {key!r}",
                hint='Declare the fields that identify a row, e.g. sync_key = ("github_id",).',
                obj=model,
                id="runs_app.E030",
            )
        )
        key = ()
    syncable = {field.name for field in _syncable(model)}
    listed = [("sync_key", name) for name in key]
    sync_fields = model.sync_fields
    if sync_fields is not None:
        if isinstance(sync_fields, str) or not isinstance(sync_fields, (tuple, list)):
            errors.append(
                checks.Error(
                    f"{label}.sync_fields must be a tuple of field names or None, "
                    f"not {sync_fields!r}",
                    hint="List the fields the source owns, or leave it None for all.",
                    obj=model,
                    id="runs_app.E030",
                )
            )
        else:
            listed += [("sync_fields", name) for name in sync_fields]
    for attribute, name in listed:
        if name in STAMPS:
            errors.append(
                checks.Error(
                    f"{label}.{attribute} names {name!r}, a run stamp kept by TrackedModel",
                    hint="Stamps are written by the services, never by rows.",
                    obj=model,
                    id="runs_app.E033",
                )
            )
        elif name not in syncable:
            errors.append(
                checks.Error(
                    f"{label}.{attribute} names {name!r}, which is not a field of the model "
                    "that rows can set",
                    hint="Name concrete fields of the model (not the automatic primary key, "
                    "not a relation's reverse side).",
                    obj=model,
                    id="runs_app.E030",
                )
            )

    if sync_fields is not None and not isinstance(sync_fields, str):
        owned = set(sync_fields) | set(key)
        for field in _syncable(model):
            if field.name in owned or field.name == model.sync_scope:
                continue
            automatic = getattr(field, "auto_now", False) or getattr(field, "auto_now_add", False)
            if not (field.has_default() or field.null or field.has_db_default() or automatic):
                errors.append(
                    checks.Error(
                        f"{label}.{field.name} is not in sync_fields and has no default",
                        hint="A flush inserts the fields the source does not own with their "
                        "default: give it a default (or null=True), or list it in sync_fields.",
                        obj=model,
                        id="runs_app.E034",
                    )
                )

    scope = model.sync_scope
    scope_ok = True
    if scope is not None:
        field = meta.get_field(scope) if isinstance(scope, str) and scope in names else None
        if field is None or not isinstance(field, SCOPE_FIELD_TYPES) or scope in STAMPS:
            scope_ok = False
            errors.append(
                checks.Error(
                    f"{label}.sync_scope must name a CharField or TextField of the model, "
                    f"or be None, not {scope!r}",
                    hint="The scope field holds the run's scope (a string); None makes the "
                    "whole table one scope.",
                    obj=model,
                    id="runs_app.E032",
                )
            )
        elif scope in key or (sync_fields is not None and scope in sync_fields):
            scope_ok = False
            errors.append(
                checks.Error(
                    f"{label}.sync_scope {scope!r} is also listed in sync_key or sync_fields",
                    hint="The flush sets the scope field from the run: leave it out of both; "
                    "the unique constraint covers it together with the key.",
                    obj=model,
                    id="runs_app.E032",
                )
            )

    if key and scope_ok and all(name in syncable for name in key):
        wanted = frozenset(key) | ({scope} if scope else frozenset())
        if wanted not in _unique_sets(model):
            errors.append(
                checks.Error(
                    f"{label}: no unique constraint covers exactly the sync key "
                    f"({', '.join(sorted(wanted))})",
                    hint="Add models.UniqueConstraint(fields=[...]) on the key fields and the "
                    "scope field (or unique=True on a one-field key of a whole-table model): "
                    "the flush upserts ON CONFLICT on it.",
                    obj=model,
                    id="runs_app.E031",
                )
            )
    return errors


def _check_cleanup_declaration(model: type[TrackedModel]) -> list[checks.CheckMessage]:
    """E035: ``sync_cleanup`` and its tombstone; E036: ``sync_grace_runs``."""
    errors: list[checks.CheckMessage] = []
    label = model_label(model)
    mode = model.sync_cleanup
    if mode not in CleanupMode.values:
        errors.append(
            checks.Error(
                f"{label}.sync_cleanup must be 'delete' or 'soft', not {mode!r}",
                hint="'delete' deletes the rows a run did not see; 'soft' tombstones them "
                "(inherit runs_app.tracking.SoftDeleteTrackedModel).",
                obj=model,
                id="runs_app.E035",
            )
        )
    elif mode == CleanupMode.SOFT and not issubclass(model, SoftDeleteTrackedModel):
        errors.append(
            checks.Error(
                f"{label}.sync_cleanup is 'soft' but the model has no tombstone fields",
                hint="Inherit runs_app.tracking.SoftDeleteTrackedModel (it adds deleted_at, "
                "deleted_by_run and deleted_reason) instead of TrackedModel.",
                obj=model,
                id="runs_app.E035",
            )
        )
    grace = model.sync_grace_runs
    if grace is not None and not (
        isinstance(grace, int) and not isinstance(grace, bool) and 1 <= grace <= MAX_GRACE_RUNS
    ):
        errors.append(
            checks.Error(
                f"{label}.sync_grace_runs must be None or an integer from 1 to "
                f"{MAX_GRACE_RUNS}, not {grace!r}",
                hint="N: cleanup removes the rows the last N completed runs of the scope all "
                "missed; None uses the CLEANUP_GRACE_RUNS setting.",
                obj=model,
                id="runs_app.E036",
            )
        )
    return errors


def _is_stamp(name: str, field: Any) -> bool:
    # The services write the stamps by their column names: a redeclared stamp must keep it.
    if name in ("created_at", "updated_at"):
        return isinstance(field, models.DateTimeField) and field.concrete and field.column == name
    if not isinstance(field, models.ForeignKey):
        return False
    target = field.remote_field.model  # a "app_label.Model" string until the registry resolves it
    label = target.lower() if isinstance(target, str) else target._meta.label_lower
    return (
        label == "runs_app.run"
        and field.null
        and field.remote_field.on_delete is models.SET_NULL
        and field.column == f"{name}_id"
    )
