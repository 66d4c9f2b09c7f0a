"""The base of every runs_app admin: read-only pages, the "operate" permission, the stylesheet."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.contrib import admin
from django.http import HttpRequest

if TYPE_CHECKING:
    ModelAdminBase = admin.ModelAdmin[Any]
else:  # ModelAdmin is generic only in django-stubs
    ModelAdminBase = admin.ModelAdmin

#: The admin's own styles (badges, times, banners, buttons), on every runs_app page.
STYLESHEET = "runs_app/admin.css"


class ReadOnlyAdmin(ModelAdminBase):
    """No add, change or delete; every field read-only; no bulk delete action."""

    class Media:
        css = {"all": [STYLESHEET]}

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_operate_permission(self, request: HttpRequest) -> bool:
        """May run the actions: the model's change permission (the admin never changes a row
        itself, so "change" here means "may operate runs")."""
        opts = self.model._meta
        return request.user.has_perm(f"{opts.app_label}.change_{opts.model_name}")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        own = [field.name for field in self.model._meta.concrete_fields]
        return [*own, *(name for name in self.readonly_fields if name not in own)]
