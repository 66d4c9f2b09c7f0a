"""The buttons of an object's page: an admin action applied to that one object, shown only
when it applies.

A button is one line, ``Button("mark_failed", _("Mark failed"), is_active)``: the action (a
method of the ModelAdmin, as in ``actions``), its label and when it applies (a predicate on the
object the page shows). ``ButtonsMixin`` gives each button a URL
(``admin:<app>_<model>_<action>``, ``<object id>/<action-slug>/``) that runs the action on that
object on a POST (405 on a GET, so a link or a prefetch never acts), with the same permission
as the action; an action returning a confirmation page shows it, and the page posts back to the
same URL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.contrib.admin.utils import quote, unquote
from django.core.exceptions import PermissionDenied
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.urls import URLPattern, path, reverse
from django.utils.translation import gettext as _

from .base import ReadOnlyAdmin

if TYPE_CHECKING:
    from django_stubs_ext import StrOrPromise


@dataclass(frozen=True)
class Button:
    action: str
    label: StrOrPromise
    applies: Callable[[Any], bool]

    @property
    def slug(self) -> str:
        return self.action.replace("_", "-")


class ButtonsMixin(ReadOnlyAdmin):
    """A ModelAdmin whose object pages show ``buttons``."""

    buttons: list[Button] = []

    def button_url_name(self, button: Button) -> str:
        opts = self.model._meta
        return f"{opts.app_label}_{opts.model_name}_{button.action}"

    def get_urls(self) -> list[URLPattern]:
        own = [
            path(
                f"<path:object_id>/{button.slug}/",
                self.admin_site.admin_view(self.button_view),
                {"action": button.action},
                name=self.button_url_name(button),
            )
            for button in self.buttons
        ]
        return [*own, *super().get_urls()]

    def shown_buttons(self, request: HttpRequest, obj: Any) -> list[dict[str, Any]]:
        """The buttons that apply to ``obj``, for the template (none without the permission)."""
        if obj is None or not self.has_operate_permission(request):
            return []
        return [
            {
                "id": f"runs-{button.slug}",
                "label": button.label,
                "url": reverse(
                    f"{self.admin_site.name}:{self.button_url_name(button)}",
                    args=[quote(obj.pk)],
                ),
            }
            for button in self.buttons
            if button.applies(obj)
        ]

    def button_view(self, request: HttpRequest, object_id: str, action: str) -> HttpResponse:
        """Run ``action`` on this one object, then back to its page."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not (self.has_view_permission(request) and self.has_operate_permission(request)):
            raise PermissionDenied
        pk = unquote(object_id)
        queryset = self.model._default_manager.filter(pk=pk)
        if not queryset.exists():
            raise Http404(
                _("No %(model)s with id %(id)r.")
                % {
                    "model": self.model._meta.verbose_name,
                    "id": pk,
                }
            )
        response = getattr(self, action)(request, queryset)
        if response is not None:
            return response  # type: ignore[no-any-return]
        opts = self.model._meta
        return HttpResponseRedirect(
            reverse(
                f"{self.admin_site.name}:{opts.app_label}_{opts.model_name}_change",
                args=[quote(pk)],
            )
        )
