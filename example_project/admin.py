"""The example project's own tracked models in the admin (plain ``ModelAdmin`` for now)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.contrib import admin

from .models import Owner, Repository

if TYPE_CHECKING:
    OwnerAdminBase = admin.ModelAdmin[Owner]
    RepositoryAdminBase = admin.ModelAdmin[Repository]
else:  # ModelAdmin is generic only in django-stubs
    OwnerAdminBase = RepositoryAdminBase = admin.ModelAdmin


@admin.register(Owner)
class OwnerAdmin(OwnerAdminBase):
    list_display = ["login", "id", "kind", "last_seen_run", "last_confirmed_run", "updated_at"]
    list_filter = ["kind"]
    list_select_related = ["last_seen_run", "last_confirmed_run"]
    search_fields = ["login"]


@admin.register(Repository)
class RepositoryAdmin(RepositoryAdminBase):
    list_display = [
        "name",
        "github_id",
        "owner",
        "stars",
        "archived",
        "last_seen_run",
        "last_confirmed_run",
        "updated_at",
    ]
    list_filter = ["archived", "language"]
    list_select_related = ["owner", "last_seen_run", "last_confirmed_run"]
    search_fields = ["name", "owner__login"]
