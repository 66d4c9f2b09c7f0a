"""The event admin: every run's events, newest first, with where each is in its delivery."""

from __future__ import annotations

import json

from django.contrib import admin
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _

from ..models import RunEvent
from .base import ReadOnlyAdmin
from .display import event_delivery, preformatted, pretty_json, run_link, shorten, timestamp
from .filters import DeliveryFilter


@admin.register(RunEvent)
class RunEventAdmin(ReadOnlyAdmin):
    list_display = ["seq", "run_page", "type", "created", "delivery", "payload_preview"]
    list_filter = [DeliveryFilter]
    search_fields = ["=run__id", "type"]
    # Newest first by primary key: cheap on a large table (the model's default ordering by run
    # would join and sort by the run's ordinal). Within a run, ids grow with seq.
    ordering = ["-pk"]
    # Counting the whole event table on every page would cost more than the page itself.
    show_full_result_count = False
    readonly_fields = ["run_page", "created", "delivery", "pretty_payload"]
    fields = ["run_page", "seq", "type", "created", "delivery", "pretty_payload"]

    @admin.display(description=_("run"), ordering="run_id")
    def run_page(self, obj: RunEvent) -> SafeString:
        return run_link(obj.run_id)

    @admin.display(description=_("created"), ordering="pk")
    def created(self, obj: RunEvent) -> SafeString | str:
        return timestamp(obj.created_at)

    @admin.display(description=_("delivery"))
    def delivery(self, obj: RunEvent) -> SafeString | str:
        return event_delivery(obj)

    @admin.display(description=_("payload"))
    def payload_preview(self, obj: RunEvent) -> str:
        return shorten(json.dumps(obj.payload, sort_keys=True, ensure_ascii=False))

    @admin.display(description=_("payload"))
    def pretty_payload(self, obj: RunEvent) -> SafeString | str:
        return preformatted(pretty_json(obj.payload))
