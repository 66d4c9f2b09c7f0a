"""The admin of a tracked model: add :class:`TrackedModelAdminMixin` to your model's admin.

::

    from django.contrib import admin
    from runs_app.tracking_admin import TrackedModelAdminMixin

    @admin.register(Repository)
    class RepositoryAdmin(TrackedModelAdminMixin, admin.ModelAdmin):
        list_display = ["github_id", "name", "stars"]

The list gains the columns "last seen" and "last confirmed" (links to the run's admin page,
sorted by the runs' creation order) and the filter "not seen by the scope's latest completed
run" (yes / no; see :mod:`runs_app.tracking` for its exact meaning). The two run stamps
are fetched with the rows (``list_select_related``), so a page of the list costs the same number
of queries for 1 row or 100. On the change form the stamps (``last_seen_run``,
``last_confirmed_run``, ``created_at``, ``updated_at``) are read-only, the two runs shown as the
same links: runs write the stamps, people do not (a stamp in a POST is ignored). Everything
else stays as your ``ModelAdmin`` says (the mixin adds no permission of its own).

Columns, filter and read-only stamps are added to what your admin declares, never twice: name
``"last_seen_run_link"`` / ``"last_confirmed_run_link"`` or :class:`NotSeenByLatestRunFilter`
yourself to place them elsewhere. The links point at runs_app's run admin
(``admin:runs_app_run_change``); without it (runs_app's admin not registered) the run id shows
as text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.contrib import admin
from django.contrib.admin.utils import display_for_value, quote
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.translation import gettext_lazy as _

from .tracking import STAMPS, TrackedModel, seen_by_latest_run, sync_spec

if TYPE_CHECKING:
    from .models import Run

    _AdminBase = admin.ModelAdmin[Any]
else:  # a mixin: the ModelAdmin comes from the class it is combined with
    _AdminBase = object

EMPTY = "-"
#: The foreign keys to Run among the stamps, and the list column showing each as a link.
RUN_STAMPS = {
    "last_seen_run": "last_seen_run_link",
    "last_confirmed_run": "last_confirmed_run_link",
}


def run_url(run_id: str, current_app: str | None = None) -> str | None:
    """The admin page of a run, or None when runs_app's run admin is not registered."""
    for app in (current_app, None) if current_app else (None,):
        try:
            return reverse("admin:runs_app_run_change", args=[quote(run_id)], current_app=app)
        except NoReverseMatch:
            continue
    return None


def run_stamp(run: Run | None, current_app: str | None = None) -> SafeString | str:
    """A run stamp as shown in a list: the run's id linked to its page, and when it started."""
    if run is None:
        return EMPTY
    started = display_for_value(run.created_at, EMPTY)
    url = run_url(run.pk, current_app)
    if url is None:
        return format_html('{} <span class="quiet">({})</span>', run.pk, started)
    return format_html('<a href="{}">{}</a> <span class="quiet">({})</span>', url, run.pk, started)


class NotSeenByLatestRunFilter(admin.SimpleListFilter):
    """Yes: rows not seen by the latest completed run of their scope that flushed the model
    (``TrackedQuerySet.not_seen_by_latest_run``); no: the rows it saw. One query, whatever the
    number of rows (the predicate is a correlated subquery of the list's own statement)."""

    title = _("not seen by the scope's latest completed run")
    parameter_name = "not_seen_by_latest_run"

    def __init__(
        self, request: HttpRequest, params: dict[str, Any], model: Any, model_admin: Any
    ) -> None:
        if sync_spec(model).scope is None:
            self.title = _("not seen by the latest completed run")
        super().__init__(request, params, model, model_admin)

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [("yes", _("Yes")), ("no", _("No"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        if self.value() == "yes":
            return queryset.filter(~seen_by_latest_run(queryset.model))
        if self.value() == "no":
            return queryset.filter(seen_by_latest_run(queryset.model))
        return None


class TrackedModelAdminMixin(_AdminBase):
    """Combine with ``admin.ModelAdmin`` (first in the bases) for a tracked model's admin: run
    stamps as links, the "not seen by the scope's latest completed run" filter, read-only
    stamps (see the module's docstring)."""

    model: type[TrackedModel]

    def get_list_display(self, request: HttpRequest) -> Any:
        shown = list(super().get_list_display(request))
        added = [
            column
            for stamp, column in RUN_STAMPS.items()
            if column not in shown and stamp not in shown
        ]
        return [*shown, *added]

    def get_list_filter(self, request: HttpRequest) -> Any:
        filters = list(super().get_list_filter(request))
        if NotSeenByLatestRunFilter not in filters:
            filters.append(NotSeenByLatestRunFilter)
        return filters

    def get_list_select_related(self, request: HttpRequest) -> Any:
        """The declared ``list_select_related`` and the two run stamps (nullable foreign keys,
        which a bare ``select_related()`` would not follow)."""
        declared = super().get_list_select_related(request)
        if declared is True:
            declared = [
                field.name
                for field in self.model._meta.concrete_fields
                if field.is_relation and not field.null
            ]
        elif declared is False:
            declared = []
        return [*declared, *(stamp for stamp in RUN_STAMPS if stamp not in declared)]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        """The declared read-only fields, the stamps, and the two link fields (so that
        ``fields`` / ``fieldsets`` may name either the raw stamps or the links)."""
        readonly = list(super().get_readonly_fields(request, obj))
        wanted = [*STAMPS, *RUN_STAMPS.values()]
        return [*readonly, *(name for name in wanted if name not in readonly)]

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        """Without declared ``fields``, Django's default (the form's fields, then the read-only
        ones) with each run stamp shown once, as its link (``*_run_link``)."""
        fields = super().get_fields(request, obj)
        if self.fields:
            return fields
        shown: list[Any] = []
        for name in fields:
            if isinstance(name, str):
                name = RUN_STAMPS.get(name, name)
            if name not in shown:
                shown.append(name)
        return shown

    @admin.display(description=_("last seen"), ordering="last_seen_run__ordinal")
    def last_seen_run_link(self, obj: TrackedModel) -> SafeString | str:
        return run_stamp(obj.last_seen_run, self.admin_site.name)

    @admin.display(description=_("last confirmed"), ordering="last_confirmed_run__ordinal")
    def last_confirmed_run_link(self, obj: TrackedModel) -> SafeString | str:
        return run_stamp(obj.last_confirmed_run, self.admin_site.name)
