from django.apps import AppConfig


class RunsAppConfig(AppConfig):
    name = "runs_app"
    verbose_name = "Runs"
    # Pinned so a host project's DEFAULT_AUTO_FIELD never makes migrations for this app.
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Registers checks only: no thread, no relay, no database connection at start-up.
        from django.core import checks

        from . import checks as runs_checks

        checks.register(runs_checks.check_settings)
        checks.register(runs_checks.check_database)
        checks.register(runs_checks.check_database_routing)
        checks.register(runs_checks.check_publisher)
