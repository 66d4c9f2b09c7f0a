"""URLs for test_tracking_admin: the user's admin site alone, without runs_app's admin (so no
run page to link to)."""

from __future__ import annotations

from django.urls import path

from tests.tracking_admin_site import site

urlpatterns = [path("tracked-admin/", site.urls)]
