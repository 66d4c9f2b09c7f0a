from django.apps import AppConfig


class TrackedAppConfig(AppConfig):
    """Tracked models of the test suite: the shapes a project's own models take."""

    name = "tests.tracked_app"
    label = "tracked_app"
    default_auto_field = "django.db.models.BigAutoField"
