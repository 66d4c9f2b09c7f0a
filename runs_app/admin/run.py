"""The run admin: the list of runs and a run's page (its whole story, a banner when something
is wrong, the buttons that apply, the newest events)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _

from .. import inspection
from ..models import Run, RunEvent, RunOutbox, RunStatus
from .banner import run_banners
from .buttons import Button, ButtonsMixin
from .cleanup_actions import CleanupActions, has_restorable_cleanup, has_withheld_cleanup
from .delivery import DELIVERY_FIELDS, DeliveryColumns, annotated, is_blocked
from .display import (
    EMPTY,
    PAYLOAD_CHARS,
    attribute,
    cleanup_result,
    duration,
    event_delivery,
    events_url,
    flush_badge,
    preformatted,
    pretty_json,
    problem_badges,
    related,
    reversible_note,
    session_badge,
    shorten,
    shown,
    source_note,
    status_badge,
    timestamp,
)
from .filters import CleanupRefusedFilter, OutboxBlockedFilter

#: The run page shows this many of the newest events; the event list has them all.
TIMELINE_EVENTS = 200

# The run page, by section (the model's own fields id, scope and ordinal come first).
IDENTITY_FIELDS = ("created", "pretty_metadata")
STATE_FIELDS = ("status", "started", "finished", "run_duration", "heartbeat", "error")
FLUSH_FIELDS = (
    "flush",
    "flush_error",
    "flushed_at",
    "flush_sessions",
    "rows_seen",
    "rows_created",
    "rows_updated",
    "rows_confirmed",
)
CLEANUP_FIELDS = (
    "cleanup",
    "cleanup_reason",
    "cleanup_message",
    "rows_removed",
    "cleanup_forced",
    "cleanup_at",
)


def has_undelivered(run: Run) -> bool:
    """Something to deliver: pending events, or a blocked outbox."""
    return annotated(run, "pending_events") > 0 or is_blocked_run(run)


def is_blocked_run(run: Run) -> bool:
    return is_blocked(related(run, "outbox"))


def is_open(run: Run) -> bool:
    state = related(run, "state")
    return state is not None and state.status == RunStatus.ACTIVE


@admin.register(Run)
class RunAdmin(DeliveryColumns, CleanupActions, ButtonsMixin):
    actions = [
        "retry_delivery",
        "skip_blocked_event",
        "mark_failed",
        "restore_cleanup",
        "approve_withheld_cleanup",
    ]
    #: The run page's buttons (see runs_app.admin.buttons): an action and when it applies.
    buttons = [
        Button("retry_delivery", _("Retry delivery now"), has_undelivered),
        Button("skip_blocked_event", _("Skip blocked event"), is_blocked_run),
        Button("mark_failed", _("Mark failed"), is_open),
        Button("restore_cleanup", _("Restore cleanup"), has_restorable_cleanup),
        Button("approve_withheld_cleanup", _("Approve withheld cleanup"), has_withheld_cleanup),
    ]

    # What an operator scans for, within 1,400 px (beside the admin's navigation and the
    # filters, the table has about 750 px): which run, of which scope, in what status and what
    # went wrong (red badges only where something did), since when and for how long, and
    # whether its events are getting out (blocked, pending, lag). The rest is on the run's page;
    # the filters find runs by flush status, refused cleanup and blocked delivery.
    list_display = ["id", "scope", "status_summary", "started", "run_duration", "delivery"]
    list_filter = [
        ("state__status", admin.ChoicesFieldListFilter),
        "scope",
        ("state__flush_status", admin.ChoicesFieldListFilter),
        CleanupRefusedFilter,
        OutboxBlockedFilter,
        ("state__started_at", admin.DateFieldListFilter),
    ]
    search_fields = ["id", "scope"]
    ordering = ["-ordinal"]
    list_per_page = 50
    fieldsets = [
        (None, {"fields": ("id", "scope", "ordinal", *IDENTITY_FIELDS)}),
        (_("State"), {"fields": STATE_FIELDS}),
        (_("Flush ledger"), {"fields": FLUSH_FIELDS}),
        (_("Cleanup ledger"), {"fields": CLEANUP_FIELDS}),
        (_("Per model"), {"fields": ("model_lines",)}),
        (_("Delivery (outbox)"), {"fields": DELIVERY_FIELDS}),
    ]
    readonly_fields = (
        *IDENTITY_FIELDS,
        *STATE_FIELDS,
        *FLUSH_FIELDS,
        *CLEANUP_FIELDS,
        "model_lines",
        *DELIVERY_FIELDS,
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Run]:
        # Joins and annotations: the list costs the same number of queries for 3 runs or 50.
        return inspection.runs_with_delivery(super().get_queryset(request))

    def outbox_of(self, obj: Run) -> RunOutbox | None:
        return related(obj, "outbox")  # type: ignore[no-any-return]

    def run_of(self, obj: Run) -> Run:
        return obj

    # -- columns and fields -------------------------------------------------------------------

    created = attribute("created_at", _("created"))

    @admin.display(description=_("status"), ordering="state__status")
    def status(self, obj: Run) -> SafeString | str:
        state = related(obj, "state")
        return status_badge(state.status) if state is not None else EMPTY

    @admin.display(description=_("status"), ordering="state__status")
    def status_summary(self, obj: Run) -> SafeString | str:
        """The status badge, then a red badge for each thing that went wrong."""
        state = related(obj, "state")
        if state is None:
            return EMPTY
        badges = [status_badge(state.status), *problem_badges(state)]
        return format_html_join(" ", "{}", ((badge,) for badge in badges))

    started = attribute("state.started_at", _("started"), ordering="state__started_at")
    finished = attribute("state.finished_at", _("finished"), ordering="state__finished_at")
    heartbeat = attribute("state.heartbeat_at", _("last heartbeat"))

    @admin.display(description=_("duration"))
    def run_duration(self, obj: Run) -> str:
        return duration(related(obj, "state"))

    @admin.display(description=_("error"))
    def error(self, obj: Run) -> SafeString | str:
        state = related(obj, "state")
        return preformatted(state.error) if state is not None else EMPTY

    @admin.display(description=_("metadata"))
    def pretty_metadata(self, obj: Run) -> SafeString | str:
        return preformatted(pretty_json(obj.metadata)) if obj.metadata else EMPTY

    @admin.display(description=_("flush sessions"))
    def flush_sessions(self, obj: Run) -> SafeString | str:
        """Every session of the run's flush (one per worker), so an unfinished or failed flush
        shows which session left it so. One query, on the run's page only."""
        sessions = list(obj.flush_sessions.all())
        if not sessions:
            return EMPTY
        rows = format_html_join(
            "",
            "<tr>" + "<td>{}</td>" * 7 + "</tr>",
            (
                (
                    session.pk,
                    session_badge(session.status),
                    session.batches,
                    _("%(seen)d (%(created)d created)")
                    % {"seen": session.rows_seen, "created": session.rows_created},
                    timestamp(session.opened_at),
                    timestamp(session.closed_at),
                    shorten(session.error) if session.error else EMPTY,
                )
                for session in sessions
            ),
        )
        return format_html(
            '<table class="runs-table"><thead><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th>'
            "<th>{}</th><th>{}</th><th>{}</th></tr></thead><tbody>{}</tbody></table>",
            _("session"),
            _("status"),
            _("batches"),
            _("rows seen"),
            _("opened"),
            _("closed"),
            _("error"),
            rows,
        )

    @admin.display(description=_("flush"), ordering="state__flush_status")
    def flush(self, obj: Run) -> SafeString | str:
        state = related(obj, "state")
        return flush_badge(state.flush_status) if state is not None else EMPTY

    @admin.display(description=_("flush error"))
    def flush_error(self, obj: Run) -> SafeString | str:
        state = related(obj, "state")
        return preformatted(state.flush_error) if state is not None else EMPTY

    flushed_at = attribute("state.flushed_at", _("flushed at"))
    rows_seen = attribute("state.rows_seen", _("rows seen"))
    rows_created = attribute("state.rows_created", _("rows created"))
    rows_updated = attribute("state.rows_updated", _("rows updated"))
    rows_confirmed = attribute("state.rows_confirmed", _("rows confirmed"))

    @admin.display(description=_("cleanup"), ordering="state__cleanup_status")
    def cleanup(self, obj: Run) -> SafeString | str:
        return cleanup_result(related(obj, "state"))

    cleanup_reason = attribute("state.cleanup_reason", _("cleanup refusal reason"))

    @admin.display(description=_("cleanup message"))
    def cleanup_message(self, obj: Run) -> SafeString | str:
        state = related(obj, "state")
        return preformatted(state.cleanup_message) if state is not None else EMPTY

    rows_removed = attribute("state.rows_removed", _("rows removed"))
    cleanup_forced = attribute("state.cleanup_forced", _("cleanup forced"))
    cleanup_at = attribute("state.cleanup_at", _("cleanup at"))

    @admin.display(description=_("models"))
    def model_lines(self, obj: Run) -> SafeString | str:
        """The ledger of each model the run flushed or cleaned up (``RunModelState``), in the
        order the run first touched them: the lines the run-level ledger above sums up. One
        query, on the run's page only."""
        lines = list(obj.model_states.order_by("id"))
        if not lines:
            return EMPTY
        rows = format_html_join(
            "",
            "<tr>" + "<td>{}</td>" * 12 + "</tr>",
            (
                (
                    line.model,
                    flush_badge(line.flush_status),
                    source_note(line),
                    shown(line.rows_seen),
                    shown(line.rows_created),
                    shown(line.rows_updated),
                    shown(line.rows_confirmed),
                    shown(line.rows_removed),
                    cleanup_result(line),
                    line.cleanup_message or EMPTY,
                    timestamp(line.cleanup_at),
                    reversible_note(line),
                )
                for line in lines
            ),
        )
        headers = format_html_join(
            "",
            "<th>{}</th>",
            (
                (header,)
                for header in [
                    _("model"),
                    _("flush"),
                    _("source read, cursor"),
                    _("seen"),
                    _("created"),
                    _("updated"),
                    _("confirmed"),
                    _("removed"),
                    _("cleanup"),
                    _("cleanup message"),
                    _("cleanup at"),
                    _("grace, approval, undo"),
                ]
            ),
        )
        return format_html(
            '<table class="runs-table runs-model-lines"><thead><tr>{}</tr></thead>'
            "<tbody>{}</tbody></table>",
            headers,
            rows,
        )

    # -- the run page: its banner, its buttons and its event timeline ---------------------------

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Run | None = None,
    ) -> HttpResponse:
        if obj is not None:
            newest = RunEvent.objects.filter(run_id=obj.pk).order_by("-seq")[:TIMELINE_EVENTS]
            context.update(
                banners=run_banners(obj),
                buttons=self.shown_buttons(request, obj),
                timeline=[
                    {
                        "event": event,
                        "created": timestamp(event.created_at),
                        "delivery": event_delivery(event),
                        "payload": pretty_json(event.payload, PAYLOAD_CHARS),
                    }
                    for event in newest
                ],
                timeline_limit=TIMELINE_EVENTS,
                events_url=events_url(obj.pk),
            )
        return super().render_change_form(request, context, add, change, form_url, obj)
