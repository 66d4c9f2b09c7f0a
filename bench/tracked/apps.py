from django.apps import AppConfig


class BenchTrackedConfig(AppConfig):
    name = "bench.tracked"
    label = "bench_tracked"
    default_auto_field = "django.db.models.BigAutoField"
