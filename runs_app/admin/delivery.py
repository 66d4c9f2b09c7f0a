"""A run's delivery (its outbox) as list columns and page fields, defined once for the run admin
and the outbox admin, so both say the same thing the same way.

The rows come annotated by :mod:`runs_app.inspection` (``runs_with_delivery`` /
``outboxes_with_delivery``: ``delivered_up_to``, ``pending_events``, ``oldest_pending_at``), so
the sortable columns sort by those annotations, the same on both models.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import Model
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from ..models import Run, RunOutbox
from .display import EMPTY, badge, lag_text, lease_text, preformatted, shorten, timestamp

#: The fields of a run's delivery, in the order the run page and the outbox page show them.
DELIVERY_FIELDS = (
    "last_event",
    "delivered_up_to",
    "pending",
    "lag",
    "cursor",
    "delivery_attempts",
    "last_delivery_error",
    "next_attempt",
    "lease",
    "blocked_since",
)


def annotated(obj: Model, name: str) -> int:
    """A count annotated by runs_app.inspection; 0 for a run without its outbox row."""
    return int(getattr(obj, name, None) or 0)


def is_blocked(outbox: RunOutbox | None) -> bool:
    return outbox is not None and outbox.blocked_at is not None


class DeliveryColumns:
    """Mixin of a ModelAdmin whose rows are runs or outboxes: subclasses say how to reach the
    row's outbox and run (``outbox_of``, ``run_of``)."""

    def outbox_of(self, obj: Any) -> RunOutbox | None:
        raise NotImplementedError

    def run_of(self, obj: Any) -> Run:
        raise NotImplementedError

    @admin.display(description=_("last seq"))
    def last_event(self, obj: Model) -> int:
        return self.run_of(obj).last_seq

    @admin.display(description=_("delivered up to"), ordering="delivered_up_to")
    def delivered_up_to(self, obj: Model) -> int:
        return annotated(obj, "delivered_up_to")

    @admin.display(description=_("pending"), ordering="pending_events")
    def pending(self, obj: Model) -> int:
        return annotated(obj, "pending_events")

    @admin.display(description=_("lag"), ordering="oldest_pending_at")
    def lag(self, obj: Model) -> str:
        return lag_text(obj.oldest_pending_at)  # type: ignore[attr-defined]

    @admin.display(description=_("next seq (cursor)"))
    def cursor(self, obj: Model) -> int | str:
        outbox = self.outbox_of(obj)
        return outbox.next_seq if outbox is not None else EMPTY

    @admin.display(description=_("attempts"))
    def delivery_attempts(self, obj: Model) -> int | str:
        outbox = self.outbox_of(obj)
        return outbox.attempts if outbox is not None else EMPTY

    @admin.display(description=_("last delivery error"))
    def last_delivery_error(self, obj: Model) -> SafeString | str:
        outbox = self.outbox_of(obj)
        return preformatted(outbox.last_error) if outbox is not None else EMPTY

    @admin.display(description=_("last error"))
    def short_last_error(self, obj: Model) -> str:
        outbox = self.outbox_of(obj)
        return shorten(outbox.last_error) if outbox is not None and outbox.last_error else EMPTY

    @admin.display(description=_("next attempt"))
    def next_attempt(self, obj: Model) -> SafeString | str:
        outbox = self.outbox_of(obj)
        return timestamp(outbox.next_attempt_at) if outbox is not None else EMPTY

    @admin.display(description=_("lease"))
    def lease(self, obj: Model) -> SafeString | str:
        return lease_text(self.outbox_of(obj))

    @admin.display(description=_("blocked since"))
    def blocked_since(self, obj: Model) -> SafeString | str:
        outbox = self.outbox_of(obj)
        return timestamp(outbox.blocked_at) if outbox is not None else EMPTY

    @admin.display(description=_("delivery"), ordering="pending_events")
    def delivery(self, obj: Model) -> SafeString | str:
        """A run's delivery in a few words: a red "blocked" badge on a blocked run, then how
        many events are pending and for how long ("-" when everything is delivered)."""
        parts: list[SafeString | str] = []
        if is_blocked(self.outbox_of(obj)):
            parts.append(badge(_("blocked"), "bad"))
        pending = annotated(obj, "pending_events")
        if pending:
            text = ngettext(
                "%(count)d pending for %(lag)s", "%(count)d pending for %(lag)s", pending
            ) % {"count": pending, "lag": lag_text(getattr(obj, "oldest_pending_at", None))}
            parts.append(format_html('<span class="runs-pending">{}</span>', text))
        if not parts:
            return EMPTY
        return format_html_join(" ", "{}", ((part,) for part in parts))
