"""The run page's reversible-cleanup actions: restore a run's cleanup, approve a withheld one.

Both act on the run's per-model ledger lines through :mod:`runs_app.services`
(``restore_cleanup``, ``safe_cleanup(..., approve=N)``), ask first on a confirmation page that
shows exactly what will happen (the rows that will come back and the conflicts, a dry run of
the restore; the withheld plan and the count to approve), and are written to the run's admin
log and, by the services, to its events with the operator's name (``restored_by``,
``approved_by``).

An approval carries the count its confirmation page showed: at most that many rows are removed,
and a plan that grew since is refused again (``approval_exceeded``) rather than approved blind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from django.apps import apps
from django.contrib import admin
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from .. import services
from ..exceptions import InvalidInput, RunsError
from ..models import CleanupStatus, Run, RunModelState
from ..tracking import is_tracked
from .actions import OperatorActions, operator, selected_run_ids
from .confirmation import confirmation_page, confirmed

#: A line whose cleanup removed (or tombstoned) rows that are not back yet: done, cut off
#: half-way, or refused after some batches (rows_referenced).
RESTORABLE = Q(
    cleanup_status__in=[CleanupStatus.DONE, CleanupStatus.IN_PROGRESS, CleanupStatus.REFUSED],
    rows_removed__gt=0,
)
#: A line whose cleanup was refused for its size, with its plan kept for approval.
WITHHELD = Q(cleanup_status=CleanupStatus.REFUSED, withheld_count__isnull=False)


def has_restorable_cleanup(run: Run) -> bool:
    return RunModelState.objects.filter(RESTORABLE, run_id=run.pk).exists()


def has_withheld_cleanup(run: Run) -> bool:
    return RunModelState.objects.filter(WITHHELD, run_id=run.pk).exists()


class _Selection(NamedTuple):
    """The ledger lines an action applies to among the selected runs."""

    lines: list[RunModelState]
    run_ids: list[str]  # the runs with such a line
    left_alone: list[str]  # the selected runs without one

    def each_model(self, run_id: str, act: Callable[[RunModelState, Any], str]) -> str:
        """``act(line, model)`` for each of the run's lines whose model is still tracked; what
        they did, joined for the admin log."""
        done = []
        for line in self.lines:
            model = _tracked(line.model)
            if line.run_id == run_id and model is not None:
                done.append(act(line, model))
        return "; ".join(done)


def _select(queryset: QuerySet[Any], condition: Q) -> _Selection:
    selected = selected_run_ids(queryset)
    lines = list(
        RunModelState.objects.filter(condition, run_id__in=selected)
        .select_related("run")
        .order_by("run_id", "id")
    )
    run_ids = sorted({line.run_id for line in lines})
    return _Selection(lines, run_ids, [run_id for run_id in selected if run_id not in run_ids])


def _tracked(label: str) -> Any:
    """The tracked model of a ledger line, or None when it is no longer one."""
    try:
        model = apps.get_model(label)
    except (LookupError, ValueError):
        return None
    return model if is_tracked(model) else None


class CleanupActions(OperatorActions):
    """The restore and approve actions, for the run admin."""

    # -- restore ------------------------------------------------------------------------------

    @admin.action(description=gettext_lazy("Restore cleanup"), permissions=["operate"])
    def restore_cleanup(
        self, request: HttpRequest, queryset: QuerySet[Any]
    ) -> TemplateResponse | None:
        selection = _select(queryset, RESTORABLE)
        nothing = _("No cleanup to restore, left alone")
        if selection.run_ids and not confirmed(request):
            return confirmation_page(
                self,
                request,
                action="restore_cleanup",
                run_ids=selection.run_ids,
                title=_("Restore these cleanups?"),
                confirm_label=_("Yes, put the rows back"),
                left_alone=selection.left_alone,
                left_alone_label=nothing,
                template="admin/runs_app/restore_cleanup_confirmation.html",
                previews=[self._preview(line) for line in selection.lines],
            )
        self.left_alone(request, selection.left_alone, nothing)
        actor = operator(request)

        def restore_model(line: RunModelState, model: Any) -> str:
            result = services.restore_cleanup(line.run_id, model, restored_by=actor)
            return _("%(model)s: %(restored)d row(s) back, %(conflicts)d conflict(s)") % {
                "model": line.model,
                "restored": result.restored,
                "conflicts": result.conflicts,
            }

        def restore(run_id: str) -> str:
            what = selection.each_model(run_id, restore_model)
            return _("Restored the cleanup: %(what)s.") % {"what": what}

        self.run_each(request, selection.run_ids, restore, _("Restored the cleanup"))
        return None

    @staticmethod
    def _preview(line: RunModelState) -> dict[str, Any]:
        """What restoring this line would do now: the restore itself, rolled back."""
        model = _tracked(line.model)
        preview: dict[str, Any] = {"line": line, "error": "", "result": None}
        if model is None:
            preview["error"] = _("%(model)s is no longer a tracked model") % {"model": line.model}
            return preview
        try:
            preview["result"] = services.restore_cleanup(line.run_id, model, dry_run=True)
        except RunsError as exc:
            preview["error"] = str(exc)
        return preview

    # -- approve ------------------------------------------------------------------------------

    @admin.action(description=gettext_lazy("Approve withheld cleanup"), permissions=["operate"])
    def approve_withheld_cleanup(
        self, request: HttpRequest, queryset: QuerySet[Any]
    ) -> TemplateResponse | None:
        selection = _select(queryset, WITHHELD)
        nothing = _("Nothing withheld, left alone")
        if selection.run_ids and not confirmed(request):
            return confirmation_page(
                self,
                request,
                action="approve_withheld_cleanup",
                run_ids=selection.run_ids,
                title=_("Approve these withheld cleanups?"),
                confirm_label=_("Yes, remove at most the rows shown"),
                left_alone=selection.left_alone,
                left_alone_label=nothing,
                template="admin/runs_app/approve_cleanup_confirmation.html",
                lines=[{"line": line, "field": approval_field(line)} for line in selection.lines],
            )
        self.left_alone(request, selection.left_alone, nothing)
        actor = operator(request)

        def approve_model(line: RunModelState, model: Any) -> str:
            # The count the confirmation page showed, carried by its form: never more.
            shown = _approved_count(request, line)
            result = services.safe_cleanup(line.run_id, model, approve=shown, approved_by=actor)
            return _("%(model)s: %(removed)d row(s) removed of %(approved)d approved") % {
                "model": line.model,
                "removed": result.removed,
                "approved": shown,
            }

        def approve(run_id: str) -> str:
            what = selection.each_model(run_id, approve_model)
            return _("Approved the withheld cleanup: %(what)s.") % {"what": what}

        self.run_each(request, selection.run_ids, approve, _("Approved the withheld cleanup"))
        return None


def _approved_count(request: HttpRequest, line: RunModelState) -> int:
    """The count shown for ``line`` on the confirmation page, which its form posts back: an
    approval is of what the operator saw, never of whatever the plan holds by now."""
    posted = request.POST.get(approval_field(line), "")
    if not (posted.isdigit() and int(posted) > 0):
        raise InvalidInput(
            "approve", "the count shown on the confirmation page is missing: approve again"
        )
    return int(posted)


def approval_field(line: RunModelState) -> str:
    """The confirmation form's field carrying the count shown for ``line``."""
    return f"approve:{line.run_id}:{line.model}"
