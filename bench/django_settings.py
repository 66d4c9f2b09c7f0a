"""Settings of the benchmark's own process: the example project's, plus ``bench.tracked`` (the
tracked model the ``flush_model_*`` benchmarks flush; no migration, its tables are created by
the benchmark). The example project itself never installs it."""

from example_project.settings import *  # noqa: F403
from example_project.settings import INSTALLED_APPS as _EXAMPLE_APPS

INSTALLED_APPS = [*_EXAMPLE_APPS, "bench.tracked"]
