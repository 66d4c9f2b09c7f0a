"""URLs for test_tracking_admin: the admin of a project's own tracked models as its authors
would write it (editable, ``TrackedModelAdminMixin`` + ``admin.ModelAdmin``, on an admin site of
their own), next to runs_app's admin (where the run links point)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.contrib import admin
from django.urls import path

from runs_app.tracking_admin import TrackedModelAdminMixin
from tests.tracked_app.models import Device, Site

if TYPE_CHECKING:
    ModelAdminBase = admin.ModelAdmin[Any]
else:
    ModelAdminBase = admin.ModelAdmin

site = admin.AdminSite(name="tracked_admin")


@admin.register(Device, site=site)
class DeviceAdmin(TrackedModelAdminMixin, ModelAdminBase):
    """Scoped (tenant), with a foreign key of its own in the list."""

    list_display = ["uid", "tenant", "name", "site"]
    list_filter = ["tenant"]
    list_select_related = ["site"]


@admin.register(Site, site=site)
class SiteAdmin(TrackedModelAdminMixin, ModelAdminBase):
    """A whole-table model with every ModelAdmin default."""


urlpatterns = [
    path("tracked-admin/", site.urls),
    path("admin/", admin.site.urls),
]
