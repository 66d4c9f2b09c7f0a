"""URLs for the metrics tests: the scrape endpoint where an operator would mount it."""

from django.urls import path

from runs_app.views import metrics

urlpatterns = [path("metrics", metrics)]
