"""The operator's view: a read-only admin of runs, their states, events, outboxes and projects.

Nothing here writes a row itself. Every page is read-only (no add, change or delete, every field
read-only); the actions ("retry delivery now", "skip blocked event", "mark failed") call the
functional API in :mod:`runs_app.services`, which owns the transactions, and report through the
messages framework.

Who may do what: staff with a model's *view* permission see its pages; the actions also need the
model's *change* permission (``runs_app.change_run`` / ``runs_app.change_runoutbox``), which here
means "may operate runs", since the admin never edits a row. Staff without any runs_app
permission see nothing of the app.

The facts the pages show (delivered up to, pending events, lag) come from
:mod:`runs_app.inspection`, shared with the ``runs_status`` command.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.utils import display_for_value, quote, unquote
from django.core.exceptions import ObjectDoesNotExist, PermissionDenied
from django.db.models import F, Model, QuerySet
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from . import inspection, services
from .exceptions import RunsError
from .models import (
    PENDING_EVENT,
    CleanupStatus,
    FlushSessionStatus,
    FlushStatus,
    Project,
    Run,
    RunEvent,
    RunModelState,
    RunOutbox,
    RunState,
    RunStatus,
)
from .tracking_admin import NotSeenByLatestRunFilter, TrackedModelAdminMixin

EMPTY = "-"
#: The run page shows this many of the newest events; the event list has them all.
TIMELINE_EVENTS = 200
#: Longer payloads are cut in the timeline (the event's own page shows the whole payload).
TIMELINE_PAYLOAD_CHARS = 2000
LIST_TEXT_CHARS = 80

STATUS_COLOURS = {
    RunStatus.ACTIVE: "#1f6fb2",
    RunStatus.COMPLETED: "#2e7d32",
    RunStatus.FAILED: "#c62828",
}
SESSION_COLOURS = {
    FlushSessionStatus.OPEN: "#1f6fb2",
    FlushSessionStatus.SUCCEEDED: "#2e7d32",
    FlushSessionStatus.FAILED: "#c62828",
}
FLUSH_COLOURS = {
    FlushStatus.NOT_STARTED: "#757575",
    FlushStatus.IN_PROGRESS: "#1f6fb2",
    FlushStatus.SUCCEEDED: "#2e7d32",
    FlushStatus.FAILED: "#c62828",
}
CLEANUP_COLOURS = {
    CleanupStatus.NOT_RUN: "#757575",
    CleanupStatus.IN_PROGRESS: "#1f6fb2",
    CleanupStatus.REFUSED: "#c62828",
    CleanupStatus.DONE: "#2e7d32",
}


# ---------------------------------------------------------------------------------------------
# Display helpers


def badge(text: str, colour: str) -> SafeString:
    """A coloured label; ``text`` is escaped."""
    return format_html(
        '<span class="runs-badge" style="background:{};color:#fff;padding:1px 7px;'
        'border-radius:9px;font-weight:bold;white-space:nowrap">{}</span>',
        colour,
        text,
    )


def status_badge(status: str) -> SafeString:
    return badge(RunStatus(status).label, STATUS_COLOURS[RunStatus(status)])


def pretty_json(value: Any, limit: int | None = None) -> str:
    """Indented JSON (not yet escaped: the caller's template or format_html escapes it)."""
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
    if limit is not None and len(text) > limit:
        return text[:limit] + f"\n… ({len(text) - limit} more characters)"
    return text


def preformatted(text: str) -> SafeString | str:
    if not text:
        return EMPTY
    return format_html('<pre style="white-space:pre-wrap;margin:0">{}</pre>', text)


def shorten(text: str, limit: int = LIST_TEXT_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _related(obj: Model, name: str) -> Any:
    """``obj.<name>`` for a one-to-one, or None when the row is missing (never a 500)."""
    try:
        return getattr(obj, name)
    except ObjectDoesNotExist:
        return None


def run_link(run_id: str) -> SafeString:
    url = reverse("admin:runs_app_run_change", args=[quote(run_id)])
    return format_html('<a href="{}">{}</a>', url, run_id)


def events_url(run_id: str) -> str:
    return reverse("admin:runs_app_runevent_changelist") + "?" + urlencode({"run__exact": run_id})


def duration(state: RunState | None) -> str:
    if state is None:
        return EMPTY
    end = state.finished_at or timezone.now()
    text = inspection.format_seconds(inspection.age_seconds(state.started_at, end))
    return text if state.finished_at else f"{text} (running)"


def lease_text(outbox: RunOutbox | None) -> str:
    if outbox is None or outbox.lease_until is None:
        return "free"
    held = outbox.lease_until > timezone.now()
    until = display_for_value(outbox.lease_until, EMPTY)
    who = f" by {outbox.leased_by}" if outbox.leased_by else ""
    return f"{'held' if held else 'expired'}{who} until {until} (token {outbox.lease_token})"


def cleanup_result(state: RunState | RunModelState | None) -> SafeString | str:
    """A cleanup outcome as a badge: the run-level one (``RunState``) or one model's."""
    if state is None:
        return EMPTY
    status = CleanupStatus(state.cleanup_status)
    text = status.label
    if status == CleanupStatus.REFUSED and state.cleanup_reason:
        text = f"refused: {state.cleanup_reason}"
    elif status == CleanupStatus.DONE and state.cleanup_forced:
        text = "done (forced)"
    return badge(text, CLEANUP_COLOURS[status])


def attribute(path: str, description: str) -> Callable[[Any, Model], Any]:
    """A read-only column or field showing ``obj.<path>`` ("state.rows_seen"), formatted like
    the admin formats values (dates localised, numbers grouped, None as "-")."""

    @admin.display(description=description)
    def show(modeladmin: Any, obj: Model) -> Any:
        value: Any = obj
        for part in path.split("."):
            value = _related(value, part) if value is not None else None
        if callable(value):
            value = value()
        return display_for_value(value, EMPTY)

    return show


# ---------------------------------------------------------------------------------------------
# Filters


class YesNoFilter(admin.SimpleListFilter):
    """A yes/no filter on one condition; subclasses say which."""

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Yes"), ("no", "No")]

    def condition(self) -> dict[str, Any]:
        raise NotImplementedError

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        if self.value() == "yes":
            return queryset.filter(**self.condition())
        if self.value() == "no":
            return queryset.exclude(**self.condition())
        return None


class CleanupRefusedFilter(YesNoFilter):
    title = "cleanup refused"
    parameter_name = "cleanup_refused"

    def condition(self) -> dict[str, Any]:
        return {"state__cleanup_status": CleanupStatus.REFUSED}


class OutboxBlockedFilter(YesNoFilter):
    title = "outbox blocked"
    parameter_name = "outbox_blocked"
    field_path = "outbox__blocked_at"

    def condition(self) -> dict[str, Any]:
        return {f"{self.field_path}__isnull": False}


class BlockedFilter(OutboxBlockedFilter):
    title = "blocked"
    field_path = "blocked_at"


class DeliveryFilter(admin.SimpleListFilter):
    title = "delivery"
    parameter_name = "delivery"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("pending", "pending"), ("published", "published"), ("skipped", "skipped")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        if self.value() == "pending":
            return queryset.filter(PENDING_EVENT)
        if self.value() == "published":
            return queryset.filter(published_at__isnull=False)
        if self.value() == "skipped":
            return queryset.filter(skipped_at__isnull=False)
        return None


# ---------------------------------------------------------------------------------------------
# Read-only base


if TYPE_CHECKING:
    ModelAdminBase = admin.ModelAdmin[Any]
else:  # ModelAdmin is generic only in django-stubs
    ModelAdminBase = admin.ModelAdmin


class ReadOnlyAdmin(ModelAdminBase):
    """No add, change or delete; every field read-only; no bulk delete action."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_operate_permission(self, request: HttpRequest) -> bool:
        """May run the actions: the model's change permission (see the module docstring)."""
        opts = self.model._meta
        return request.user.has_perm(f"{opts.app_label}.change_{opts.model_name}")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        own = [field.name for field in self.model._meta.concrete_fields]
        return [*own, *(name for name in self.readonly_fields if name not in own)]


# ---------------------------------------------------------------------------------------------
# Actions shared by the run and outbox pages: they act on run ids (an outbox's pk is its run id).


def _selected_run_ids(queryset: QuerySet[Any]) -> list[str]:
    return [str(pk) for pk in queryset.order_by().values_list("pk", flat=True)]


class DeliveryActions(ReadOnlyAdmin):
    actions = ["retry_delivery", "skip_blocked_event"]

    def _report(
        self, request: HttpRequest, done: list[str], what: str, errors: list[tuple[str, str]]
    ) -> None:
        for run_id, error in errors:
            self.message_user(request, f"Run {run_id}: {error}", messages.ERROR)
        if done:
            self.message_user(
                request, f"{what} for {len(done)} run(s): {', '.join(done)}.", messages.SUCCESS
            )

    @admin.action(description="Retry delivery now", permissions=["operate"])
    def retry_delivery(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        done: list[str] = []
        errors: list[tuple[str, str]] = []
        for run_id in _selected_run_ids(queryset):
            try:
                services.retry_outbox(run_id)
            except RunsError as exc:
                errors.append((run_id, str(exc)))
            else:
                done.append(run_id)
        self._report(request, done, "Delivery retried now", errors)

    @admin.action(description="Skip blocked event", permissions=["operate"])
    def skip_blocked_event(
        self, request: HttpRequest, queryset: QuerySet[Any]
    ) -> TemplateResponse | None:
        """Asks for confirmation first (like Django's "delete selected"): skipping an event
        means it is never delivered."""
        selected = _selected_run_ids(queryset)
        blocked = set(
            RunOutbox.objects.filter(run_id__in=selected, blocked_at__isnull=False).values_list(
                "run_id", flat=True
            )
        )
        not_blocked = [run_id for run_id in selected if run_id not in blocked]
        if blocked and request.POST.get("post") != "yes":
            return self._skip_confirmation(request, sorted(blocked), not_blocked)
        if not_blocked:
            self.message_user(
                request,
                f"Not blocked, nothing skipped: {', '.join(not_blocked)}.",
                messages.WARNING,
            )
        done: list[str] = []
        errors: list[tuple[str, str]] = []
        for run_id in sorted(blocked):
            try:
                services.skip_outbox_event(run_id)
            except RunsError as exc:
                errors.append((run_id, str(exc)))
            else:
                done.append(run_id)
        self._report(request, done, "Skipped the blocked event", errors)
        return None

    def _skip_confirmation(
        self, request: HttpRequest, run_ids: list[str], not_blocked: list[str]
    ) -> TemplateResponse:
        # The head event of each blocked run: the one at its outbox cursor.
        heads = (
            RunEvent.objects.filter(run_id__in=run_ids, seq=F("run__outbox__next_seq"))
            .select_related("run__outbox")
            .order_by("run_id")
        )
        context = {
            **self.admin_site.each_context(request),
            "title": "Skip the blocked events?",
            "opts": self.model._meta,
            "run_ids": run_ids,
            "not_blocked": not_blocked,
            "heads": [
                {
                    "event": event,
                    "payload": pretty_json(event.payload, TIMELINE_PAYLOAD_CHARS),
                    "outbox": event.run.outbox,
                }
                for event in heads
            ],
            # Blocked by a gap (no event at the cursor): the skip moves the cursor past it.
            "gaps": RunOutbox.objects.filter(run_id__in=run_ids)
            .exclude(run_id__in=[event.run_id for event in heads])
            .order_by("run_id"),
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "action": "skip_blocked_event",
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(
            request, "admin/runs_app/skip_blocked_event_confirmation.html", context
        )


# ---------------------------------------------------------------------------------------------
# Runs


@admin.register(Run)
class RunAdmin(DeliveryActions):
    actions = ["retry_delivery", "skip_blocked_event", "mark_failed"]
    list_display = [
        "id",
        "scope",
        "status",
        "started",
        "finished",
        "run_duration",
        "flush",
        "rows_seen_removed",
        "cleanup",
        "last_seq",
        "delivered_up_to",
        "pending",
        "lag",
        "blocked",
    ]
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
    readonly_fields = [
        "status",
        "started",
        "finished",
        "run_duration",
        "heartbeat",
        "error",
        "pretty_metadata",
        "flush",
        "flush_error",
        "flushed_at",
        "flush_sessions",
        "rows_seen",
        "rows_created",
        "rows_updated",
        "rows_confirmed",
        "cleanup",
        "cleanup_reason",
        "cleanup_message",
        "rows_removed",
        "cleanup_forced",
        "cleanup_at",
        "model_lines",
        "delivered_up_to",
        "pending",
        "lag",
        "next_seq",
        "attempts",
        "last_error",
        "next_attempt",
        "lease",
        "blocked_since",
    ]
    fieldsets = [
        (None, {"fields": ["id", "scope", "ordinal", "created_at", "pretty_metadata"]}),
        (
            "State",
            {"fields": ["status", "started", "finished", "run_duration", "heartbeat", "error"]},
        ),
        (
            "Flush ledger",
            {
                "fields": [
                    "flush",
                    "flush_error",
                    "flushed_at",
                    "flush_sessions",
                    "rows_seen",
                    "rows_created",
                    "rows_updated",
                    "rows_confirmed",
                ]
            },
        ),
        (
            "Cleanup ledger",
            {
                "fields": [
                    "cleanup",
                    "cleanup_reason",
                    "cleanup_message",
                    "rows_removed",
                    "cleanup_forced",
                    "cleanup_at",
                ]
            },
        ),
        ("Per model", {"fields": ["model_lines"]}),
        (
            "Delivery (outbox)",
            {
                "fields": [
                    "last_seq",
                    "delivered_up_to",
                    "pending",
                    "lag",
                    "next_seq",
                    "attempts",
                    "last_error",
                    "next_attempt",
                    "lease",
                    "blocked_since",
                ]
            },
        ),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Run]:
        # Joins and annotations: the list costs the same number of queries for 3 runs or 50.
        return inspection.runs_with_delivery(super().get_queryset(request))

    # -- columns and fields -------------------------------------------------------------------

    @admin.display(description="status", ordering="state__status")
    def status(self, obj: Run) -> SafeString | str:
        state = _related(obj, "state")
        return status_badge(state.status) if state is not None else EMPTY

    started = admin.display(description="started", ordering="state__started_at")(
        attribute("state.started_at", "started")
    )
    finished = admin.display(description="finished", ordering="state__finished_at")(
        attribute("state.finished_at", "finished")
    )
    heartbeat = attribute("state.heartbeat_at", "last heartbeat")

    @admin.display(description="duration")
    def run_duration(self, obj: Run) -> str:
        return duration(_related(obj, "state"))

    @admin.display(description="error")
    def error(self, obj: Run) -> SafeString | str:
        state = _related(obj, "state")
        return preformatted(state.error) if state is not None else EMPTY

    @admin.display(description="metadata")
    def pretty_metadata(self, obj: Run) -> SafeString | str:
        return preformatted(pretty_json(obj.metadata)) if obj.metadata else EMPTY

    @admin.display(description="flush sessions")
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
                    badge(
                        FlushSessionStatus(session.status).label,
                        SESSION_COLOURS[FlushSessionStatus(session.status)],
                    ),
                    session.batches,
                    f"{session.rows_seen} ({session.rows_created} created)",
                    display_for_value(session.opened_at, EMPTY),
                    display_for_value(session.closed_at, EMPTY),
                    shorten(session.error) if session.error else EMPTY,
                )
                for session in sessions
            ),
        )
        return format_html(
            "<table><thead><tr><th>session</th><th>status</th><th>batches</th><th>rows seen</th>"
            "<th>opened</th><th>closed</th><th>error</th></tr></thead><tbody>{}</tbody></table>",
            rows,
        )

    @admin.display(description="flush", ordering="state__flush_status")
    def flush(self, obj: Run) -> SafeString | str:
        state = _related(obj, "state")
        if state is None:
            return EMPTY
        status = FlushStatus(state.flush_status)
        return badge(status.label, FLUSH_COLOURS[status])

    @admin.display(description="flush error")
    def flush_error(self, obj: Run) -> SafeString | str:
        state = _related(obj, "state")
        return preformatted(state.flush_error) if state is not None else EMPTY

    flushed_at = attribute("state.flushed_at", "flushed at")
    rows_seen = attribute("state.rows_seen", "rows seen")
    rows_created = attribute("state.rows_created", "rows created")
    rows_updated = attribute("state.rows_updated", "rows updated")
    rows_confirmed = attribute("state.rows_confirmed", "rows confirmed")

    @admin.display(description="rows seen / removed")
    def rows_seen_removed(self, obj: Run) -> str:
        state = _related(obj, "state")
        if state is None:
            return EMPTY
        return f"{state.rows_seen} / {state.rows_removed}"

    @admin.display(description="cleanup", ordering="state__cleanup_status")
    def cleanup(self, obj: Run) -> SafeString | str:
        return cleanup_result(_related(obj, "state"))

    cleanup_reason = attribute("state.cleanup_reason", "cleanup refusal reason")

    @admin.display(description="cleanup message")
    def cleanup_message(self, obj: Run) -> SafeString | str:
        state = _related(obj, "state")
        return preformatted(state.cleanup_message) if state is not None else EMPTY

    rows_removed = attribute("state.rows_removed", "rows removed")

    @admin.display(description="models")
    def model_lines(self, obj: Run) -> SafeString | str:
        """The ledger of each model the run flushed or cleaned up (``RunModelState``), in the
        order the run first touched them: the lines the run-level ledger above sums up. One
        query, on the run's page only."""
        lines = list(obj.model_states.order_by("id"))
        if not lines:
            return EMPTY
        rows = format_html_join(
            "",
            "<tr>" + "<td>{}</td>" * 10 + "</tr>",
            (
                (
                    line.model,
                    badge(
                        FlushStatus(line.flush_status).label,
                        FLUSH_COLOURS[FlushStatus(line.flush_status)],
                    ),
                    display_for_value(line.rows_seen, EMPTY),
                    display_for_value(line.rows_created, EMPTY),
                    display_for_value(line.rows_updated, EMPTY),
                    display_for_value(line.rows_confirmed, EMPTY),
                    display_for_value(line.rows_removed, EMPTY),
                    cleanup_result(line),
                    line.cleanup_message or EMPTY,
                    display_for_value(line.cleanup_at, EMPTY),
                )
                for line in lines
            ),
        )
        return format_html(
            '<table class="runs-model-lines"><thead><tr><th>model</th><th>flush</th>'
            "<th>seen</th><th>created</th><th>updated</th><th>confirmed</th><th>removed</th>"
            "<th>cleanup</th><th>cleanup message</th><th>cleanup at</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            rows,
        )

    cleanup_forced = attribute("state.cleanup_forced", "cleanup forced")
    cleanup_at = attribute("state.cleanup_at", "cleanup at")

    @admin.display(description="delivered up to", ordering="delivered_up_to")
    def delivered_up_to(self, obj: Run) -> int:
        return int(obj.delivered_up_to)  # type: ignore[attr-defined]

    @admin.display(description="pending", ordering="pending_events")
    def pending(self, obj: Run) -> int:
        return int(obj.pending_events)  # type: ignore[attr-defined]

    @admin.display(description="lag", ordering="oldest_pending_at")
    def lag(self, obj: Run) -> str:
        oldest = obj.oldest_pending_at  # type: ignore[attr-defined]
        return inspection.format_seconds(inspection.age_seconds(oldest)) or EMPTY

    next_seq = attribute("outbox.next_seq", "next seq (cursor)")
    attempts = attribute("outbox.attempts", "attempts")

    @admin.display(description="last delivery error")
    def last_error(self, obj: Run) -> SafeString | str:
        outbox = _related(obj, "outbox")
        return preformatted(outbox.last_error) if outbox is not None else EMPTY

    next_attempt = attribute("outbox.next_attempt_at", "next attempt")

    @admin.display(description="lease")
    def lease(self, obj: Run) -> str:
        return lease_text(_related(obj, "outbox"))

    blocked_since = attribute("outbox.blocked_at", "blocked since")

    @admin.display(description="blocked", boolean=True, ordering="outbox__blocked_at")
    def blocked(self, obj: Run) -> bool:
        outbox = _related(obj, "outbox")
        return outbox is not None and outbox.blocked_at is not None

    # -- actions ------------------------------------------------------------------------------

    @admin.action(description="Mark failed", permissions=["operate"])
    def mark_failed(self, request: HttpRequest, queryset: QuerySet[Run]) -> None:
        selected = _selected_run_ids(queryset)
        active = set(
            RunState.objects.filter(run_id__in=selected, status=RunStatus.ACTIVE).values_list(
                "run_id", flat=True
            )
        )
        closed = [run_id for run_id in selected if run_id not in active]
        if closed:
            self.message_user(
                request, f"Not active, left as they are: {', '.join(closed)}.", messages.WARNING
            )
        done: list[str] = []
        errors: list[tuple[str, str]] = []
        message = f"Marked failed in the admin by {request.user.get_username()}."
        for run_id in sorted(active):
            try:
                services.fail_run(run_id, message, reason="marked_failed")
            except RunsError as exc:
                errors.append((run_id, str(exc)))
            else:
                done.append(run_id)
        self._report(request, done, "Marked failed", errors)

    # -- the run page: its buttons and its event timeline ---------------------------------------

    OBJECT_ACTIONS = {
        "retry-delivery": "retry_delivery",
        "skip-blocked-event": "skip_blocked_event",
        "mark-failed": "mark_failed",
    }

    def get_urls(self) -> list[URLPattern]:
        own = [
            path(
                f"<path:object_id>/{slug}/",
                self.admin_site.admin_view(self.object_action_view),
                {"action": action},
                name=f"runs_app_run_{action}",
            )
            for slug, action in self.OBJECT_ACTIONS.items()
        ]
        return [*own, *super().get_urls()]

    def object_action_view(self, request: HttpRequest, object_id: str, action: str) -> Any:
        """The run page's buttons: the same actions, applied to this one run."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not (self.has_view_permission(request) and self.has_operate_permission(request)):
            raise PermissionDenied
        run_id = unquote(object_id)
        queryset = Run.objects.filter(pk=run_id)
        if not queryset.exists():
            raise Http404(f"No run with id {run_id!r}.")
        response = getattr(self, action)(request, queryset)
        if response is not None:
            return response
        return HttpResponseRedirect(reverse("admin:runs_app_run_change", args=[quote(run_id)]))

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        run_id = unquote(object_id)
        state = RunState.objects.filter(run_id=run_id).only("status").first()
        newest = RunEvent.objects.filter(run_id=run_id).order_by("-seq")[:TIMELINE_EVENTS]
        context = {
            **(extra_context or {}),
            "timeline": [
                {"event": event, "payload": pretty_json(event.payload, TIMELINE_PAYLOAD_CHARS)}
                for event in newest
            ],
            "timeline_limit": TIMELINE_EVENTS,
            "events_url": events_url(run_id),
            "can_operate": self.has_operate_permission(request),
            "run_is_active": state is not None and state.status == RunStatus.ACTIVE,
        }
        return super().change_view(request, object_id, form_url, context)


# ---------------------------------------------------------------------------------------------
# Run states, outboxes, events, projects


@admin.register(RunState)
class RunStateAdmin(ReadOnlyAdmin):
    list_display = [
        "run_page",
        "scope",
        "status_badge",
        "started_at",
        "finished_at",
        "heartbeat_at",
        "flush_status",
        "rows_seen",
        "cleanup_status",
        "cleanup_reason",
        "rows_removed",
    ]
    list_filter = ["status", "flush_status", "cleanup_status", "scope"]
    search_fields = ["run__id", "scope"]
    ordering = ["-run__ordinal"]
    readonly_fields = ["run_page", "status_badge"]

    @admin.display(description="run", ordering="run__ordinal")
    def run_page(self, obj: RunState) -> SafeString:
        return run_link(obj.run_id)

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: RunState) -> SafeString:
        return status_badge(obj.status)

    fields = [
        "run_page",
        "scope",
        "status_badge",
        "error",
        "started_at",
        "finished_at",
        "heartbeat_at",
        "flush_status",
        "flush_error",
        "flushed_at",
        "rows_seen",
        "rows_created",
        "rows_updated",
        "rows_confirmed",
        "cleanup_status",
        "cleanup_reason",
        "cleanup_message",
        "rows_removed",
        "cleanup_forced",
        "cleanup_at",
    ]


@admin.register(RunOutbox)
class RunOutboxAdmin(DeliveryActions):
    list_display = [
        "run_page",
        "scope",
        "next_seq",
        "last_seq",
        "pending",
        "lag",
        "attempts",
        "next_attempt_at",
        "lease",
        "blocked_at",
        "short_last_error",
    ]
    list_filter = [BlockedFilter]
    search_fields = ["run__id", "run__scope"]
    ordering = ["-run__ordinal"]
    readonly_fields = ["run_page", "scope", "last_seq", "pending", "lag", "lease", "error_text"]
    fields = [
        "run_page",
        "scope",
        "next_seq",
        "last_seq",
        "pending",
        "lag",
        "attempts",
        "error_text",
        "next_attempt_at",
        "lease",
        "blocked_at",
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[RunOutbox]:
        return inspection.outboxes_with_delivery(super().get_queryset(request))

    @admin.display(description="run", ordering="run__ordinal")
    def run_page(self, obj: RunOutbox) -> SafeString:
        return run_link(obj.run_id)

    @admin.display(description="scope", ordering="run__scope")
    def scope(self, obj: RunOutbox) -> str:
        return obj.run.scope

    @admin.display(description="last seq", ordering="run__last_seq")
    def last_seq(self, obj: RunOutbox) -> int:
        return obj.run.last_seq

    @admin.display(description="pending", ordering="pending_events")
    def pending(self, obj: RunOutbox) -> int:
        return int(obj.pending_events)  # type: ignore[attr-defined]

    @admin.display(description="lag", ordering="oldest_pending_at")
    def lag(self, obj: RunOutbox) -> str:
        oldest = obj.oldest_pending_at  # type: ignore[attr-defined]
        return inspection.format_seconds(inspection.age_seconds(oldest)) or EMPTY

    @admin.display(description="lease")
    def lease(self, obj: RunOutbox) -> str:
        return lease_text(obj)

    @admin.display(description="last error")
    def short_last_error(self, obj: RunOutbox) -> str:
        return shorten(obj.last_error) or EMPTY

    @admin.display(description="last error")
    def error_text(self, obj: RunOutbox) -> SafeString | str:
        return preformatted(obj.last_error)


@admin.register(RunEvent)
class RunEventAdmin(ReadOnlyAdmin):
    list_display = [
        "seq",
        "run_page",
        "type",
        "created_at",
        "delivery",
        "payload_preview",
    ]
    list_filter = [DeliveryFilter]
    search_fields = ["=run__id", "type"]
    # Newest first by primary key: cheap on a large table (the model's default ordering by run
    # would join and sort by the run's ordinal). Within a run, ids grow with seq.
    ordering = ["-pk"]
    # Counting the whole event table on every page would cost more than the page itself.
    show_full_result_count = False
    readonly_fields = ["run_page", "delivery", "pretty_payload"]
    fields = ["run_page", "seq", "type", "created_at", "delivery", "pretty_payload"]

    @admin.display(description="run", ordering="run_id")
    def run_page(self, obj: RunEvent) -> SafeString:
        return run_link(obj.run_id)

    @admin.display(description="delivery")
    def delivery(self, obj: RunEvent) -> str:
        if obj.skipped_at is not None:
            return f"skipped {display_for_value(obj.skipped_at, EMPTY)}"
        if obj.published_at is not None:
            return f"published {display_for_value(obj.published_at, EMPTY)}"
        return "pending"

    @admin.display(description="payload")
    def payload_preview(self, obj: RunEvent) -> str:
        return shorten(json.dumps(obj.payload, sort_keys=True, ensure_ascii=False))

    @admin.display(description="payload")
    def pretty_payload(self, obj: RunEvent) -> SafeString | str:
        return preformatted(pretty_json(obj.payload))


@admin.register(Project)
class ProjectAdmin(TrackedModelAdminMixin, ReadOnlyAdmin):
    """The built-in tracked model, through the same mixin users add to their own models."""

    list_display = [
        "key",
        "scope",
        "name",
        "last_seen_run_link",
        "last_confirmed_run_link",
        "updated_at",
    ]
    list_filter = ["scope", NotSeenByLatestRunFilter]
    search_fields = ["key", "name", "scope"]
    show_full_result_count = False
    readonly_fields = ["pretty_data"]
    fields = [
        "scope",
        "key",
        "name",
        "pretty_data",
        "last_seen_run_link",
        "last_confirmed_run_link",
        "created_at",
        "updated_at",
    ]

    @admin.display(description="data")
    def pretty_data(self, obj: Project) -> SafeString | str:
        return preformatted(pretty_json(obj.data))
