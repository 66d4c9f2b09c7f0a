"""Settings of the multi-database tests' subprocesses (``tests/test_databases.py``): the suite's
settings with runs_app, the example project's and the suite's tracked models on the ``runs``
alias (``RUNS_APP_DATABASE_URL``, required), their reads on ``replica`` (a second connection to
the same database), everything else on ``default`` (``DATABASE_URL``)."""

import os

from django.core.exceptions import ImproperlyConfigured

if not os.environ.get("RUNS_APP_DATABASE_URL"):
    raise ImproperlyConfigured("tests.multidb_settings needs RUNS_APP_DATABASE_URL")

from tests.settings import *  # noqa: F403
from tests.settings import DATABASES

DATABASES["replica"] = {**DATABASES["runs"], "TEST": {"MIRROR": "runs"}}
DATABASE_ROUTERS = ["tests.multidb_router.MultiDbRouter"]
