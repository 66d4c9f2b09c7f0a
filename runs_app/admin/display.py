"""How the admin shows a value: badges, times, JSON, links, durations. Small functions returning
escaped HTML (``SafeString``) or plain text; how they look is ``static/runs_app/admin.css``
(classes only, no inline style)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from django.contrib import admin
from django.contrib.admin.utils import display_for_value, quote
from django.core.exceptions import ObjectDoesNotExist
from django.db.models import Model
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.translation import gettext

from .. import inspection
from ..exceptions import CLEANUP_EXPECTED_REFUSALS
from ..models import (
    CleanupStatus,
    FlushMode,
    FlushSessionStatus,
    FlushStatus,
    RunEvent,
    RunModelState,
    RunOutbox,
    RunState,
    RunStatus,
)

if TYPE_CHECKING:
    from django_stubs_ext import StrOrPromise

EMPTY = "-"
#: Longer payloads are cut on the run page and the confirmation pages (the event's own page
#: shows the whole payload).
PAYLOAD_CHARS = 2000
#: Longer texts are cut in a list column.
LIST_TEXT_CHARS = 80

# A badge's tone is a CSS class (runs-badge--<tone>): blue "info", green "ok", red "bad",
# grey "quiet". A status missing here (a new one) shows grey rather than failing the page.
STATUS_TONES = {
    RunStatus.ACTIVE: "info",
    RunStatus.COMPLETED: "ok",
    RunStatus.FAILED: "bad",
}
SESSION_TONES = {
    FlushSessionStatus.OPEN: "info",
    FlushSessionStatus.SUCCEEDED: "ok",
    FlushSessionStatus.FAILED: "bad",
}
FLUSH_TONES = {
    FlushStatus.NOT_STARTED: "quiet",
    FlushStatus.IN_PROGRESS: "info",
    FlushStatus.SUCCEEDED: "ok",
    FlushStatus.FAILED: "bad",
}
CLEANUP_TONES = {
    CleanupStatus.NOT_RUN: "quiet",
    CleanupStatus.IN_PROGRESS: "info",
    CleanupStatus.REFUSED: "bad",
    CleanupStatus.DONE: "ok",
    CleanupStatus.RESTORED: "info",
}


def badge(text: StrOrPromise, tone: str, title: StrOrPromise = "") -> SafeString:
    """A coloured label (``tone``: info, ok, bad or quiet), with ``title`` as its tooltip;
    both escaped."""
    if title:
        return format_html(
            '<span class="runs-badge runs-badge--{}" title="{}">{}</span>', tone, title, text
        )
    return format_html('<span class="runs-badge runs-badge--{}">{}</span>', tone, text)


def status_badge(status: str) -> SafeString:
    return badge(RunStatus(status).label, STATUS_TONES.get(RunStatus(status), "quiet"))


def problem_badges(state: RunState) -> list[SafeString]:
    """Red badges for what went wrong in a run's ledger, none when nothing did: its flush
    failed (or never finished, on a closed run), its cleanup refused (the reason as tooltip)."""
    problems = []
    if state.flush_status == FlushStatus.FAILED:
        problems.append(badge(gettext("flush failed"), "bad", title=state.flush_error))
    elif state.flush_status == FlushStatus.IN_PROGRESS and state.status != RunStatus.ACTIVE:
        problems.append(badge(gettext("flush unfinished"), "bad"))
    if refused_for_a_problem(state):
        problems.append(badge(gettext("cleanup refused"), "bad", title=state.cleanup_reason))
    return problems


def refused_for_a_problem(state: RunState | RunModelState) -> bool:
    """The cleanup was refused, and not as designed (an incremental run's refusal is no
    problem: it never cleans up)."""
    return (
        state.cleanup_status == CleanupStatus.REFUSED
        and state.cleanup_reason not in CLEANUP_EXPECTED_REFUSALS
    )


def flush_badge(status: str) -> SafeString:
    return badge(FlushStatus(status).label, FLUSH_TONES.get(FlushStatus(status), "quiet"))


def session_badge(status: str) -> SafeString:
    session = FlushSessionStatus(status)
    return badge(session.label, SESSION_TONES.get(session, "quiet"))


def timestamp(value: datetime | None) -> SafeString | str:
    """A moment to the second with its time zone, in the current time zone, never wrapped:
    ``2026-12-02 15:04:05 UTC`` (the ``<time>`` element carries the ISO form)."""
    if value is None:
        return EMPTY
    local = timezone.localtime(value)
    return format_html(
        '<time class="runs-time" datetime="{}">{} {}</time>',
        local.isoformat(),
        local.strftime("%Y-%m-%d %H:%M:%S"),
        local.tzname() or "",
    )


def pretty_json(value: Any, limit: int | None = None) -> str:
    """Indented JSON (not yet escaped: the caller's template or format_html escapes it)."""
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
    if limit is not None and len(text) > limit:
        more = gettext("%(count)d more characters") % {"count": len(text) - limit}
        return f"{text[:limit]}\n… ({more})"
    return text


def preformatted(text: str) -> SafeString | str:
    """Text kept as written (line breaks, indentation), wrapped to the column."""
    if not text:
        return EMPTY
    return format_html('<pre class="runs-pre">{}</pre>', text)


def shorten(text: str, limit: int = LIST_TEXT_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def related(obj: Model | None, name: str) -> Any:
    """``obj.<name>`` for a one-to-one, or None when the row is missing (never a 500)."""
    if obj is None:
        return None
    try:
        return getattr(obj, name)
    except ObjectDoesNotExist:
        return None


def run_url(run_id: str) -> str:
    return reverse("admin:runs_app_run_change", args=[quote(run_id)])


def run_link(run_id: str) -> SafeString:
    return format_html('<a href="{}">{}</a>', run_url(run_id), run_id)


def events_url(run_id: str) -> str:
    return reverse("admin:runs_app_runevent_changelist") + "?" + urlencode({"run__exact": run_id})


def duration(state: RunState | None) -> str:
    if state is None:
        return EMPTY
    end = state.finished_at or timezone.now()
    text = inspection.format_seconds(inspection.age_seconds(state.started_at, end))
    return text if state.finished_at else gettext("%(duration)s (running)") % {"duration": text}


def lag_text(oldest_pending_at: datetime | None) -> str:
    """The age of a run's oldest undelivered event ("-" when nothing is pending)."""
    return inspection.format_seconds(inspection.age_seconds(oldest_pending_at)) or EMPTY


def lease_text(outbox: RunOutbox | None) -> SafeString | str:
    """Who holds a run's delivery lease and until when ("free" when nobody does)."""
    if outbox is None or outbox.lease_until is None:
        return gettext("free")
    held = outbox.lease_until > timezone.now()
    return format_html(
        "{} {} {} ({})",
        gettext("held") if held else gettext("expired"),
        gettext("by %(holder)s until") % {"holder": outbox.leased_by}
        if outbox.leased_by
        else gettext("until"),
        timestamp(outbox.lease_until),
        gettext("token %(token)s") % {"token": outbox.lease_token},
    )


def event_delivery(event: RunEvent) -> SafeString | str:
    """Where an event is in its run's delivery: pending, published (when) or skipped (when)."""
    if event.skipped_at is not None:
        return format_html("{} {}", gettext("skipped"), timestamp(event.skipped_at))
    if event.published_at is not None:
        return format_html("{} {}", gettext("published"), timestamp(event.published_at))
    return gettext("pending")


def cleanup_result(state: RunState | RunModelState | None) -> SafeString | str:
    """A cleanup outcome as a badge: the run-level one (``RunState``) or one model's."""
    if state is None:
        return EMPTY
    status = CleanupStatus(state.cleanup_status)
    text: StrOrPromise = status.label
    if status == CleanupStatus.REFUSED and state.cleanup_reason:
        text = gettext("refused: %(reason)s") % {"reason": state.cleanup_reason}
        if not refused_for_a_problem(state):
            return badge(text, "quiet")
    elif status == CleanupStatus.DONE and state.cleanup_forced:
        text = gettext("done (forced)")
    return badge(text, CLEANUP_TONES.get(status, "quiet"))


def shown(value: Any) -> SafeString | str:
    """Any field's value as the admin shows it, except moments, shown as ``timestamp``."""
    if isinstance(value, datetime):
        return timestamp(value)
    return display_for_value(value, EMPTY)


def attribute(
    path: str, description: StrOrPromise, ordering: str | None = None
) -> Callable[[Any, Model], Any]:
    """A read-only column or field showing ``obj.<path>`` ("state.rows_seen"), formatted by
    ``shown`` (times to the second with their zone, numbers grouped, None as "-")."""

    @admin.display(description=description, ordering=ordering)
    def show(modeladmin: Any, obj: Model) -> Any:
        found: Any = obj
        for part in path.split("."):
            found = related(found, part)
        if callable(found):
            found = found()
        return shown(found)

    return show


#: How many characters of a cursor's JSON the run page shows.
CURSOR_SHOWN = 80


def source_note(line: Any) -> str:
    """How a model's ledger line read its source: "full" or "incremental", and the cursor it
    set (its JSON with sorted keys, so that SQLite and PostgreSQL's jsonb, which reorders keys,
    show the same text; cut to ``CURSOR_SHOWN`` characters)."""
    note = str(FlushMode(line.flush_mode).label)
    if line.cursor is not None:
        text = json.dumps(line.cursor, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
        if len(text) > CURSOR_SHOWN:
            text = text[: CURSOR_SHOWN - 1] + "…"
        note += ", " + gettext("cursor %(cursor)s") % {"cursor": text}
    return note


def reversible_note(line: Any) -> str:
    """What a model's ledger line says of reversible cleanup: revived rows, rows waiting out
    their grace, a withheld plan, an approval, a restore (or EMPTY)."""
    notes: list[str] = []
    if line.rows_revived:
        notes.append(gettext("%(count)d revived") % {"count": line.rows_revived})
    if line.rows_waiting:
        notes.append(gettext("%(count)d waiting out their grace") % {"count": line.rows_waiting})
    if line.withheld_count is not None:
        notes.append(gettext("withheld: %(count)d to approve") % {"count": line.withheld_count})
    if line.approved_count is not None:
        notes.append(
            gettext("approved by %(who)s for %(count)d")
            % {"who": line.approved_by, "count": line.approved_count}
        )
    if line.restored_at is not None:
        notes.append(
            gettext("restored by %(who)s: %(back)d back, %(conflicts)d conflict(s)")
            % {
                "who": line.restored_by or "?",
                "back": line.rows_restored,
                "conflicts": line.restore_conflicts,
            }
        )
    if line.rows_purged:
        notes.append(gettext("%(count)d tombstone(s) purged") % {"count": line.rows_purged})
    return "; ".join(notes) or EMPTY
