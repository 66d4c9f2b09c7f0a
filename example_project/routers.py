"""The example project's database router: runs_app on a database of its own.

Active only when ``RUNS_APP_DATABASE_URL`` is set (see ``settings.py``): runs_app's models and
the project's tracked models (``Owner``, ``Repository``: their stamps are foreign keys to
``Run``, so they must live on runs_app's database) go to the ``runs`` alias; every other app
(auth, sessions, the admin's log...) stays on ``default``.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Model

#: The alias ``settings.py`` adds for ``RUNS_APP_DATABASE_URL``.
RUNS_DATABASE = "runs"


class RunsAppRouter:
    """Routes the apps in ``app_labels`` to ``RUNS_DATABASE``, reads and writes alike, and
    migrates them there only (and nothing else there)."""

    app_labels: frozenset[str] = frozenset({"runs_app", "example_project"})

    def _routed(self, model: type[Model]) -> bool:
        return model._meta.app_label in self.app_labels

    def db_for_read(self, model: type[Model], **hints: Any) -> str | None:
        return RUNS_DATABASE if self._routed(model) else None

    def db_for_write(self, model: type[Model], **hints: Any) -> str | None:
        return RUNS_DATABASE if self._routed(model) else None

    def allow_relation(self, obj1: Model, obj2: Model, **hints: Any) -> bool | None:
        # Two routed objects may relate whichever alias each was read through (a subclass may
        # read from a replica); a relation across the two databases could not be a foreign key.
        routed = self._routed(type(obj1)), self._routed(type(obj2))
        if all(routed):
            return True
        return False if any(routed) else None

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool:
        return (db == RUNS_DATABASE) == (app_label in self.app_labels)
