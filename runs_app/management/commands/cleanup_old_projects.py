"""``manage.py cleanup_old_projects``: a thin shell over ``services.safe_cleanup`` (for
``Project`` by default, or any tracked model with ``--model app_label.ModelName``).

A cleanup refused for its size (``empty_run``, ``too_many_deletions``) is withheld: the command
prints its plan and how to approve it, ``--approve N`` (``--by NAME``, default the login name).

Exit codes: 0 done (or a dry run that would proceed), 1 refused (or a dry run that would
refuse), 2 usage error or unknown run.
"""

from __future__ import annotations

import getpass
from typing import Any

from django.core.management.base import CommandError, CommandParser

from runs_app import services
from runs_app.db import db_alias
from runs_app.exceptions import CleanupRefused, InvalidInput, RunNotFound
from runs_app.management.argtypes import positive_int, tracked_model
from runs_app.management.base import StrictCommand
from runs_app.models import Project, Run, RunModelState
from runs_app.tracking import sync_spec

EXIT_REFUSED = 1
EXIT_USAGE = 2


class Command(StrictCommand):
    help = (
        "Delete the rows of a tracked model (default: runs_app.Project) that a run of their "
        "scope did not see, behind the safety guards. "
        "Exit 0: done; 1: refused (reason on stderr); 2: usage error or unknown run."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--run", dest="run_id", metavar="RUN_ID", help="the run to clean up")
        parser.add_argument(
            "--scope", help="clean up with the scope's latest run, whatever its status"
        )
        parser.add_argument(
            "--model",
            type=tracked_model,
            default=Project,
            metavar="APP_LABEL.MODEL",
            help="the tracked model to clean up (default: runs_app.Project)",
        )
        parser.add_argument("--dry-run", action="store_true", help="print the plan; write nothing")
        parser.add_argument(
            "--force",
            action="store_true",
            help="override the empty_run and too_many_deletions guards (recorded)",
        )
        parser.add_argument(
            "--approve",
            type=positive_int,
            metavar="N",
            help="approve the run's withheld cleanup: remove at most N rows (the count the "
            "refusal showed); refused again if the plan grew past N",
        )
        parser.add_argument(
            "--by",
            metavar="NAME",
            help="who approves (recorded; default: the login name)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        run = self._run(options["run_id"], options["scope"])
        if options["force"] and options["approve"] is not None:
            raise CommandError("give --force or --approve N, not both", returncode=EXIT_USAGE)
        approve = options["approve"]
        approved_by = ""
        if approve is not None:
            approved_by = options["by"] or getpass.getuser()
        elif options["by"]:
            raise CommandError("--by names who approves: give it with --approve N", returncode=2)
        spec = sync_spec(options["model"])
        try:
            result = services.safe_cleanup(
                run,
                options["model"],
                dry_run=options["dry_run"],
                force=options["force"],
                approve=approve,
                approved_by=approved_by,
            )
        except InvalidInput as exc:
            raise CommandError(str(exc), returncode=EXIT_USAGE) from exc
        except CleanupRefused as exc:
            message = f"cleanup refused: {exc.reason}: {exc.message}"
            withheld = self._withheld(run, spec.label)
            if withheld:
                message += "\n" + withheld
            raise CommandError(message, returncode=EXIT_REFUSED) from exc
        where = f"run {run.pk} (scope {run.scope!r})"
        spec = sync_spec(options["model"])
        noun = "project(s)" if options["model"] is Project else f"row(s) of {spec.label}"
        first = ", ".join(str(key) for key in result.sample_keys)
        sample = f" (first keys: {first})" if result.sample_keys else ""
        forced = " Forced: a guard was overridden." if result.forced else ""
        if result.approved_by:
            forced = f" Approved by {result.approved_by}."
        verb = "tombstone" if result.mode == "soft" else "remove"
        waiting = (
            f" {result.waiting} more wait out their grace period (not seen by a newer run "
            "of the last runs)."
            if result.waiting
            else ""
        )
        if result.dry_run:
            self.stdout.write(
                f"Dry run for {where}: {result.planned} {noun} to {verb}{sample}.{waiting}{forced}"
            )
            if result.refusal is not None:
                raise CommandError(
                    f"a cleanup would be refused: {result.refusal}: {result.refusal_message}",
                    returncode=EXIT_REFUSED,
                )
            return
        done = "tombstoned" if result.mode == "soft" else "removed"
        self.stdout.write(f"Cleanup of {where}: {done} {result.removed} {noun}.{waiting}{forced}")

    def _withheld(self, run: Run, label: str) -> str:
        """How to approve the plan a refusal withheld, if it did."""
        # The write database: the refusal just committed this plan (a replica may lag).
        line = RunModelState.objects.using(db_alias()).filter(run=run, model=label).first()
        if line is None or line.withheld_count is None:
            return ""
        keys = ", ".join(str(key) for key in line.withheld_keys)
        return (
            f"Withheld plan: {line.withheld_count} row(s) (first keys: {keys or '-'}). "
            f"To approve it: cleanup_old_projects --run {run.pk} --model {label} "
            f"--approve {line.withheld_count}"
        )

    def _run(self, run_id: str | None, scope: str | None) -> Run:
        if (run_id is None) == (scope is None):
            raise CommandError("give exactly one of --run RUN_ID or --scope SCOPE", returncode=2)
        try:
            if run_id is not None:
                return services.get_run(run_id)
            run = services.latest_run(scope or "")
        except (RunNotFound, InvalidInput) as exc:
            raise CommandError(str(exc), returncode=EXIT_USAGE) from exc
        if run is None:
            raise CommandError(f"scope {scope!r} has no run", returncode=EXIT_USAGE)
        return run
