"""The operator's actions: retry delivery now, skip a blocked event, mark a run failed.

Each acts on run ids (an outbox's primary key is its run id) through :mod:`runs_app.services`,
which own the transactions, and for every run:

- reports the outcome as a message (an error names the run and the service's reason);
- writes what it did to Django's admin log (``LogEntry`` on the run: the run's History page
  shows who did what, when);
- names the operator (``actor=`` their username) in the event the service writes
  (``outbox.retried``, ``outbox.skipped``, ``run.failed``).

The two that cannot be undone (a skipped event is never delivered; a failed run stays failed)
ask first, on a page made by :func:`runs_app.admin.confirmation.confirmation_page`.
Who may run them: see ``ReadOnlyAdmin.has_operate_permission``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib import admin, messages
from django.db.models import F, QuerySet
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from .. import services
from ..exceptions import RunsError
from ..models import Run, RunEvent, RunOutbox, RunState, RunStatus
from .base import ReadOnlyAdmin
from .confirmation import confirmation_page, confirmed
from .display import PAYLOAD_CHARS, flush_badge, pretty_json, timestamp


def selected_run_ids(queryset: QuerySet[Any]) -> list[str]:
    """The run ids of the selected runs or outboxes, sorted."""
    return sorted(str(pk) for pk in queryset.order_by().values_list("pk", flat=True))


def operator(request: HttpRequest) -> str:
    """The name the events and messages give the operator: their username."""
    return request.user.get_username()


class OperatorActions(ReadOnlyAdmin):
    """The actions, for the run and outbox admins (each lists the ones it offers)."""

    def run_each(
        self,
        request: HttpRequest,
        run_ids: list[str],
        act: Callable[[str], str],
        done_message: str,
    ) -> None:
        """``act(run_id)`` for each run (it returns the admin log's line for that run), then
        one success message for all, one error message per failure."""
        done: dict[str, str] = {}
        for run_id in run_ids:
            try:
                done[run_id] = act(run_id)
            except RunsError as exc:
                self.message_user(
                    request,
                    _("Run %(run)s: %(error)s") % {"run": run_id, "error": exc},
                    messages.ERROR,
                )
        for run in Run.objects.filter(pk__in=done).order_by("pk"):
            self.log_change(request, run, done[run.pk])
        if done:
            self.message_user(
                request,
                _("%(what)s for %(count)d run(s): %(runs)s.")
                % {"what": done_message, "count": len(done), "runs": ", ".join(done)},
                messages.SUCCESS,
            )

    def left_alone(self, request: HttpRequest, run_ids: list[str], why: str) -> None:
        if run_ids:
            self.message_user(
                request,
                _("%(why)s: %(runs)s.") % {"why": why, "runs": ", ".join(run_ids)},
                messages.WARNING,
            )

    # -- retry --------------------------------------------------------------------------------

    @admin.action(description=gettext_lazy("Retry delivery now"), permissions=["operate"])
    def retry_delivery(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        actor = operator(request)

        def retry(run_id: str) -> str:
            services.retry_outbox(run_id, actor=actor)
            return _("Retried delivery now.")

        self.run_each(request, selected_run_ids(queryset), retry, _("Delivery retried now"))

    # -- skip ---------------------------------------------------------------------------------

    @admin.action(description=gettext_lazy("Skip blocked event"), permissions=["operate"])
    def skip_blocked_event(
        self, request: HttpRequest, queryset: QuerySet[Any]
    ) -> TemplateResponse | None:
        selected = selected_run_ids(queryset)
        blocked = sorted(
            RunOutbox.objects.filter(run_id__in=selected, blocked_at__isnull=False).values_list(
                "run_id", flat=True
            )
        )
        not_blocked = [run_id for run_id in selected if run_id not in blocked]
        if blocked and not confirmed(request):
            return self.skip_confirmation(request, blocked, not_blocked)
        self.left_alone(request, not_blocked, _("Not blocked, nothing skipped"))
        actor = operator(request)

        def skip(run_id: str) -> str:
            event = services.skip_outbox_event(run_id, actor=actor)
            if event is None:
                return _("Skipped the gap blocking delivery.")
            return _("Skipped the blocked event: seq %(seq)d (%(type)s).") % {
                "seq": event.seq,
                "type": event.type,
            }

        self.run_each(request, blocked, skip, _("Skipped the blocked event"))
        return None

    def skip_confirmation(
        self, request: HttpRequest, run_ids: list[str], not_blocked: list[str]
    ) -> TemplateResponse:
        # The head event of each blocked run: the one at its outbox cursor.
        heads = (
            RunEvent.objects.filter(run_id__in=run_ids, seq=F("run__outbox__next_seq"))
            .select_related("run__outbox")
            .order_by("run_id")
        )
        return confirmation_page(
            self,
            request,
            action="skip_blocked_event",
            run_ids=run_ids,
            title=_("Skip the blocked events?"),
            confirm_label=_("Yes, skip these events"),
            left_alone=not_blocked,
            left_alone_label=_("Not blocked, left alone"),
            template="admin/runs_app/skip_blocked_event_confirmation.html",
            heads=[
                {
                    "event": event,
                    "payload": pretty_json(event.payload, PAYLOAD_CHARS),
                    "outbox": event.run.outbox,
                    "blocked_since": timestamp(event.run.outbox.blocked_at),
                }
                for event in heads
            ],
            # Blocked by a gap (no event at the cursor): the skip moves the cursor past it.
            gaps=RunOutbox.objects.filter(run_id__in=run_ids)
            .exclude(run_id__in=[event.run_id for event in heads])
            .order_by("run_id"),
        )

    # -- mark failed --------------------------------------------------------------------------

    @admin.action(description=gettext_lazy("Mark failed"), permissions=["operate"])
    def mark_failed(self, request: HttpRequest, queryset: QuerySet[Any]) -> TemplateResponse | None:
        selected = selected_run_ids(queryset)
        active = sorted(
            RunState.objects.filter(run_id__in=selected, status=RunStatus.ACTIVE).values_list(
                "run_id", flat=True
            )
        )
        closed = [run_id for run_id in selected if run_id not in active]
        if active and not confirmed(request):
            return confirmation_page(
                self,
                request,
                action="mark_failed",
                run_ids=active,
                title=_("Mark these runs failed?"),
                confirm_label=_("Yes, mark them failed"),
                left_alone=closed,
                left_alone_label=_("Not active, left as they are"),
                template="admin/runs_app/mark_failed_confirmation.html",
                runs=[
                    {
                        "state": state,
                        "started": timestamp(state.started_at),
                        "heartbeat": timestamp(state.heartbeat_at),
                        "flush": flush_badge(state.flush_status),
                    }
                    for state in RunState.objects.filter(run_id__in=active).order_by("run_id")
                ],
            )
        self.left_alone(request, closed, _("Not active, left as they are"))
        actor = operator(request)
        error = _("Marked failed in the admin by %(user)s.") % {"user": actor}

        def fail(run_id: str) -> str:
            services.fail_run(run_id, error, reason="marked_failed", actor=actor)
            return _("Marked failed.")

        self.run_each(request, active, fail, _("Marked failed"))
        return None
