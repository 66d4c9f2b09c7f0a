"""Views of runs_app: the Prometheus scrape endpoint.

Mount it where your scraper can reach it (and, since it names your scopes, behind whatever
guards your internal endpoints)::

    from runs_app.views import metrics

    urlpatterns = [path("metrics", metrics)]
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_safe

from .metrics import prometheus_text


@require_safe
def metrics(request: HttpRequest) -> HttpResponse:
    """The database facts of :mod:`runs_app.metrics` in Prometheus' text format, read afresh
    at every scrape (a fixed number of queries). 501 when ``prometheus-client`` is absent."""
    try:
        body, content_type = prometheus_text()
    except ImportError as exc:
        return HttpResponse(f"{exc}\n", status=501, content_type="text/plain; charset=utf-8")
    return HttpResponse(body, content_type=content_type)
