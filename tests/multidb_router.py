"""The multi-database tests' router: the example project's, plus the suite's tracked models and
a read replica.

``replica`` is a second connection to runs_app's database (same server, same database): what a
replica without lag looks like to Django. Reads of the routed models go there, writes to
``runs``; the guard (:mod:`tests.multidb_manage`) refuses any write on ``replica``, and any read
there while this thread holds a transaction on ``runs`` (a read that feeds a write must see that
transaction, so it must be on the write alias).
"""

from __future__ import annotations

from typing import Any

from django.db.models import Model

from example_project.routers import RUNS_DATABASE, RunsAppRouter

REPLICA = "replica"

__all__ = ["REPLICA", "RUNS_DATABASE", "MultiDbRouter"]


class MultiDbRouter(RunsAppRouter):
    app_labels = RunsAppRouter.app_labels | {"tracked_app"}

    def db_for_read(self, model: type[Model], **hints: Any) -> str | None:
        return REPLICA if self._routed(model) else None

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool:
        return db != REPLICA and super().allow_migrate(db, app_label, **hints)
