"""``manage.py restore_cleanup``: a thin shell over ``services.restore_cleanup``: put back the
rows one run's cleanup of a tracked model removed (or tombstoned).

Exit codes: 0 restored (or a dry run, or already restored: nothing to do), 1 refused (the
cleanup never ran, was refused, or its audit was pruned), 2 usage error or unknown run.
"""

from __future__ import annotations

import getpass
from typing import Any

from django.core.management.base import CommandError, CommandParser

from runs_app import services
from runs_app.exceptions import InvalidInput, RestoreRefused, RunNotFound
from runs_app.management.argtypes import tracked_model
from runs_app.management.base import StrictCommand
from runs_app.models import Project

EXIT_REFUSED = 1
EXIT_USAGE = 2


class Command(StrictCommand):
    help = (
        "Undo a run's cleanup of a tracked model (default: runs_app.Project): every removed row "
        "back with its primary key, from the cleanup's audit events (or its tombstones cleared). "
        "Rows whose key exists again are not overwritten: they are listed as conflicts. "
        "Exit 0: restored or nothing to do; 1: refused; 2: usage error or unknown run."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--run", dest="run_id", metavar="RUN_ID", required=True, help="the run whose cleanup"
        )
        parser.add_argument(
            "--model",
            type=tracked_model,
            default=Project,
            metavar="APP_LABEL.MODEL",
            help="the tracked model (default: runs_app.Project)",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="print what would come back; write nothing"
        )
        parser.add_argument(
            "--by", metavar="NAME", help="who restores (recorded; default: the login name)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            run = services.get_run(options["run_id"])
            result = services.restore_cleanup(
                run,
                options["model"],
                dry_run=options["dry_run"],
                restored_by=options["by"] or getpass.getuser(),
            )
        except (RunNotFound, InvalidInput) as exc:
            raise CommandError(str(exc), returncode=EXIT_USAGE) from exc
        except RestoreRefused as exc:
            raise CommandError(
                f"restore refused: {exc.reason}: {exc.message}", returncode=EXIT_REFUSED
            ) from exc
        where = f"run {run.pk} (scope {run.scope!r}), {result.model}"
        if result.already_restored:
            when = f"{result.restored_at:%Y-%m-%d %H:%M:%S %Z}"
            self.stdout.write(
                f"Nothing to do: the cleanup of {where} was restored already "
                f"(by {result.restored_by or 'someone'} at {when})."
            )
            return
        first = ", ".join(str(key) for key in result.sample_keys)
        lines = [
            f"{'Dry run: would restore' if result.dry_run else 'Restored'} {result.restored} "
            f"row(s) of {where}" + (f" (first keys: {first})" if first else "") + "."
        ]
        if result.conflicts:
            keys = ", ".join(str(key) for key in result.conflict_keys)
            lines.append(
                f"{result.conflicts} conflict(s) left as they are (their key exists again, or "
                f"a row they reference is gone): {keys}."
            )
        if result.missing:
            lines.append(
                f"{result.missing} removed row(s) have no audit event any more (pruned): "
                "they cannot come back."
            )
        self.stdout.write("\n".join(lines))
