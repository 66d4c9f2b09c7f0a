"""The confirmation page of an action that cannot be undone (like Django's "delete selected"):
the first POST shows what will happen; the page posts the same action back with ``post=yes``.

One helper for every such action, from the changelist or a run page's button alike::

    if not confirmed(request):
        return confirmation_page(self, request, action="mark_failed", run_ids=active,
                                 title=..., confirm_label=...,
                                 template="admin/runs_app/mark_failed_confirmation.html")

The template extends ``admin/runs_app/confirmation.html`` and fills its ``question`` and
``details`` blocks (or the generic ``question`` text is shown). Nothing is done on a GET: the
actions only run on a POST, and the run page's buttons refuse a GET (405).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from django.contrib import admin
from django.contrib.admin import helpers
from django.http import HttpRequest
from django.template.response import TemplateResponse

if TYPE_CHECKING:
    from django_stubs_ext import StrOrPromise

TEMPLATE = "admin/runs_app/confirmation.html"


def confirmed(request: HttpRequest) -> bool:
    """The operator said yes on the confirmation page."""
    return request.method == "POST" and request.POST.get("post") == "yes"


def confirmation_page(
    modeladmin: admin.ModelAdmin[Any],
    request: HttpRequest,
    *,
    action: str,
    run_ids: Sequence[str],
    title: StrOrPromise,
    confirm_label: StrOrPromise,
    question: StrOrPromise = "",
    left_alone: Sequence[str] = (),
    left_alone_label: StrOrPromise = "",
    template: str = TEMPLATE,
    **context: Any,
) -> TemplateResponse:
    """The page asking to confirm ``action`` on ``run_ids`` (the runs it applies to, carried
    in the form; ``left_alone``: the selected runs it does not apply to, only listed). Extra
    ``context`` goes to ``template``."""
    opts = modeladmin.model._meta
    page = {
        **modeladmin.admin_site.each_context(request),
        "title": title,
        "question": question,
        "opts": opts,
        "media": modeladmin.media,
        "action": action,
        "run_ids": list(run_ids),
        "left_alone": list(left_alone),
        "left_alone_label": left_alone_label,
        "confirm_label": confirm_label,
        "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        **context,
    }
    request.current_app = modeladmin.admin_site.name
    return TemplateResponse(request, template, page)
