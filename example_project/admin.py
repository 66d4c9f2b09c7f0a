"""The example project's own tracked models in the admin, with runs_app's tracked-model mixin:
last seen / last confirmed run as links, and the "not seen by the latest run" filter."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.contrib import admin

from runs_app.tracking_admin import TrackedModelAdminMixin

from .models import Owner, Repository

if TYPE_CHECKING:
    OwnerAdminBase = admin.ModelAdmin[Owner]
    RepositoryAdminBase = admin.ModelAdmin[Repository]
else:  # ModelAdmin is generic only in django-stubs
    OwnerAdminBase = RepositoryAdminBase = admin.ModelAdmin


@admin.register(Owner)
class OwnerAdmin(TrackedModelAdminMixin, OwnerAdminBase):
    list_display = ["login", "id", "kind", "updated_at"]
    list_filter = ["kind"]
    search_fields = ["login"]


@admin.register(Repository)
class RepositoryAdmin(TrackedModelAdminMixin, RepositoryAdminBase):
    list_display = ["name", "github_id", "owner", "stars", "archived", "updated_at"]
    list_filter = ["archived", "language"]
    list_select_related = ["owner"]
    search_fields = ["name", "owner__login"]
