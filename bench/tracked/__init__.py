"""The benchmark's own tracked model (``flush_model_*`` rows of bench/run.py), as a user's project
would declare it. Installed only by bench/django_settings.py; it has no migration: the benchmark
creates its tables itself (``bench.tracked.models.create_tables``)."""
