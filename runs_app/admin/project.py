"""The Project admin: the built-in tracked model, through the same mixin users add to their own
tracked models' admins (:mod:`runs_app.tracking_admin`)."""

from __future__ import annotations

from django.contrib import admin
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _

from ..models import Project
from ..tracking_admin import NotSeenByLatestRunFilter, TrackedModelAdminMixin
from .base import ReadOnlyAdmin
from .display import preformatted, pretty_json


@admin.register(Project)
class ProjectAdmin(TrackedModelAdminMixin, ReadOnlyAdmin):
    list_display = [
        "key",
        "scope",
        "name",
        "last_seen_run_link",
        "last_confirmed_run_link",
        "updated_at",
    ]
    list_filter = ["scope", NotSeenByLatestRunFilter]
    search_fields = ["key", "name", "scope"]
    show_full_result_count = False
    readonly_fields = ["pretty_data"]
    fields = [
        "scope",
        "key",
        "name",
        "pretty_data",
        "last_seen_run_link",
        "last_confirmed_run_link",
        "created_at",
        "updated_at",
    ]

    @admin.display(description=_("data"))
    def pretty_data(self, obj: Project) -> SafeString | str:
        return preformatted(pretty_json(obj.data))
