"""The list filters of runs_app's admin that are not a plain field's."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _

from ..models import PENDING_EVENT, CleanupStatus


class YesNoFilter(admin.SimpleListFilter):
    """A yes/no filter on one condition; subclasses say which."""

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [("yes", _("Yes")), ("no", _("No"))]

    def condition(self) -> dict[str, Any]:
        raise NotImplementedError

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        if self.value() == "yes":
            return queryset.filter(**self.condition())
        if self.value() == "no":
            return queryset.exclude(**self.condition())
        return None


class CleanupRefusedFilter(YesNoFilter):
    title = _("cleanup refused")
    parameter_name = "cleanup_refused"

    def condition(self) -> dict[str, Any]:
        return {"state__cleanup_status": CleanupStatus.REFUSED}


class OutboxBlockedFilter(YesNoFilter):
    """Runs whose delivery is blocked (on the run list)."""

    title = _("outbox blocked")
    parameter_name = "outbox_blocked"
    field_path = "outbox__blocked_at"

    def condition(self) -> dict[str, Any]:
        return {f"{self.field_path}__isnull": False}


class BlockedFilter(OutboxBlockedFilter):
    """Blocked outboxes (on the outbox list)."""

    title = _("blocked")
    field_path = "blocked_at"


class DeliveryFilter(admin.SimpleListFilter):
    """Events by where they are in their run's delivery."""

    title = _("delivery")
    parameter_name = "delivery"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [("pending", _("pending")), ("published", _("published")), ("skipped", _("skipped"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        if self.value() == "pending":
            return queryset.filter(PENDING_EVENT)
        if self.value() == "published":
            return queryset.filter(published_at__isnull=False)
        if self.value() == "skipped":
            return queryset.filter(skipped_at__isnull=False)
        return None
