"""The outbox admin: every run's delivery, with the same columns and actions as the run list."""

from __future__ import annotations

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _

from .. import inspection
from ..models import Run, RunOutbox
from .actions import OperatorActions
from .delivery import DELIVERY_FIELDS, DeliveryColumns
from .display import run_link
from .filters import BlockedFilter

OUTBOX_FIELDS = ("run_page", "scope", *DELIVERY_FIELDS)


@admin.register(RunOutbox)
class RunOutboxAdmin(DeliveryColumns, OperatorActions):
    actions = ["retry_delivery", "skip_blocked_event"]
    # Like the run list, it fits 1,400 px: the delivery summary (blocked, pending, lag), the
    # retries (attempts, next one) and the last error; cursor, last seq and lease on the page.
    list_display = [
        "run_page",
        "scope",
        "delivery",
        "delivery_attempts",
        "next_attempt",
        "short_last_error",
    ]
    list_filter = [BlockedFilter]
    search_fields = ["run__id", "run__scope"]
    ordering = ["-run__ordinal"]
    fields = readonly_fields = OUTBOX_FIELDS

    def get_queryset(self, request: HttpRequest) -> QuerySet[RunOutbox]:
        return inspection.outboxes_with_delivery(super().get_queryset(request))

    def outbox_of(self, obj: RunOutbox) -> RunOutbox:
        return obj

    def run_of(self, obj: RunOutbox) -> Run:
        return obj.run

    @admin.display(description=_("run"), ordering="run__ordinal")
    def run_page(self, obj: RunOutbox) -> SafeString:
        return run_link(obj.run_id)

    @admin.display(description=_("scope"), ordering="run__scope")
    def scope(self, obj: RunOutbox) -> str:
        return obj.run.scope
