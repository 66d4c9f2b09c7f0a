"""Settings of the test suite: the example project's, with the suite's own tracked models."""

from example_project.settings import *  # noqa: F403
from example_project.settings import INSTALLED_APPS as _EXAMPLE_APPS

INSTALLED_APPS = [*_EXAMPLE_APPS, "tests.tracked_app"]
