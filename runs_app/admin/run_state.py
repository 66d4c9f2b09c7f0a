"""The run state admin: the runs' ledgers as one table (the run page shows the same, per run)."""

from __future__ import annotations

from django.contrib import admin
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _

from ..models import RunState
from .base import ReadOnlyAdmin
from .display import attribute, run_link, status_badge


@admin.register(RunState)
class RunStateAdmin(ReadOnlyAdmin):
    list_display = [
        "run_page",
        "scope",
        "status_badge",
        "started",
        "finished",
        "heartbeat",
        "flush_status",
        "rows_seen",
        "cleanup_status",
        "cleanup_reason",
        "rows_removed",
    ]
    list_filter = ["status", "flush_status", "cleanup_status", "scope"]
    search_fields = ["run__id", "scope"]
    ordering = ["-run__ordinal"]
    readonly_fields = [
        "run_page",
        "status_badge",
        "started",
        "finished",
        "heartbeat",
        "flushed",
        "cleaned",
    ]
    fields = [
        "run_page",
        "scope",
        "status_badge",
        "error",
        "started",
        "finished",
        "heartbeat",
        "flush_status",
        "flush_error",
        "flushed",
        "rows_seen",
        "rows_created",
        "rows_updated",
        "rows_confirmed",
        "cleanup_status",
        "cleanup_reason",
        "cleanup_message",
        "rows_removed",
        "cleanup_forced",
        "cleaned",
    ]

    started = attribute("started_at", _("started"), ordering="started_at")
    finished = attribute("finished_at", _("finished"), ordering="finished_at")
    heartbeat = attribute("heartbeat_at", _("last heartbeat"), ordering="heartbeat_at")
    flushed = attribute("flushed_at", _("flushed at"))
    cleaned = attribute("cleanup_at", _("cleanup at"))

    @admin.display(description=_("run"), ordering="run__ordinal")
    def run_page(self, obj: RunState) -> SafeString:
        return run_link(obj.run_id)

    @admin.display(description=_("status"), ordering="status")
    def status_badge(self, obj: RunState) -> SafeString:
        return status_badge(obj.status)
