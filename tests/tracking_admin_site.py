"""URLs for test_tracking_admin: a tracked model's admin as a user would write it (editable,
``TrackedModelAdminMixin`` + ``admin.ModelAdmin``, on an admin site of their own), next to
runs_app's admin (where the run links point)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.contrib import admin
from django.urls import path

from runs_app.models import Project
from runs_app.tracking_admin import TrackedModelAdminMixin

if TYPE_CHECKING:
    ModelAdminBase = admin.ModelAdmin[Any]
else:
    ModelAdminBase = admin.ModelAdmin

site = admin.AdminSite(name="tracked_admin")


@admin.register(Project, site=site)
class EditableProjectAdmin(TrackedModelAdminMixin, ModelAdminBase):
    list_display = ["key", "name"]


urlpatterns = [
    path("tracked-admin/", site.urls),
    path("admin/", admin.site.urls),
]
