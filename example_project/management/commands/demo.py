"""``manage.py demo``: the README's main job. Six sync cycles and a relay pass, so every
guarantee shows once on a fresh database:

1. ``sync_projects``: a full sync of the sample source (500 projects);
2. ``sync_projects --remove 5``: the source no longer lists 5 projects; cleanup removes exactly
   those, and their rows travel in ``projects.removed`` events;
3. ``sync_projects --fail-after 250``: the source fails between two pages; the run ends
   ``failed`` (never ``completed``), cleanup refuses with ``flush_failed``, and no project is
   lost;
4. ``sync_repositories``: the example project's own tracked models (``Owner``,
   ``Repository``: integer keys, typed columns, a foreign key) synced from their sample source,
   one flush session per model, page by page;
5. ``sync_repositories --fail-after-page 2``: the source fails between two pages of
   repositories; the run ends ``failed``, each model's cleanup refuses with ``flush_failed``
   (the owners' flush succeeded, but the run's view of the source is incomplete), and not one
   row is lost;
6. ``sync_repositories --drop 5``: the source no longer lists 5 repositories; cleanup removes
   exactly those, and their rows travel in ``repositories.removed`` events;
7. ``restore_cleanup``: that cleanup was wrong after all: undone with one command, every row
   back with its primary key and values;
8. ``sync_repositories --drop 200``: the source lost two thirds of its repositories; cleanup
   refuses (``too_many_deletions``) and withholds its plan; ``cleanup_old_projects --approve
   200`` approves it for the size shown, and exactly those go;
9. ``drain_outbox --once``: every event of the seven runs leaves through the outbox.

Exit 0 when each step behaved as the guarantees say, 1 otherwise.
"""

from __future__ import annotations

from typing import Any

from django.core.management import call_command
from django.core.management.base import CommandError, CommandParser

from example_project.management.commands.sync_repositories import (
    SAMPLE_SOURCE,
    SCOPE,
    SampleSource,
)
from example_project.models import Owner, Repository
from runs_app import services
from runs_app.management.base import StrictCommand
from runs_app.models import Project, RunEvent, RunModelState, RunStatus

REPOSITORY = "example_project.Repository"


class Command(StrictCommand):
    help = (
        "The example project's tour: projects and the project's own repositories, each synced, "
        "synced with removals and synced from a failing source; then drain the outbox."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--scope", default="example", help="the scope to sync (example)")

    def handle(self, *args: Any, **options: Any) -> None:
        scope: str = options["scope"]
        self._step("1. A full sync of the sample source", scope)
        self._step("2. The source no longer lists 5 projects", scope, "--remove", "5")
        kept = Project.objects.filter(scope=scope).count()
        try:
            self._step("3. The source fails between two pages", scope, "--fail-after", "250")
        except CommandError as refusal:
            self.stdout.write(f"   -> {refusal} (as intended)")
        else:
            raise CommandError("the failing sync did not fail", returncode=1)
        if Project.objects.filter(scope=scope).count() != kept:
            raise CommandError("projects were lost after a failed flush", returncode=1)
        self.stdout.write(f"   -> still {kept} project(s): nothing was lost.")

        self._repositories()

        self.stdout.write(
            self.style.MIGRATE_HEADING("\n9. Deliver the events (drain_outbox --once)")
        )
        pending = RunEvent.objects.filter(published_at__isnull=True).count()
        call_command("drain_outbox", "--once", stdout=self.stdout, stderr=self.stderr)
        left = RunEvent.objects.filter(published_at__isnull=True, skipped_at__isnull=True).count()
        self.stdout.write(f"   -> {pending - left} event(s) delivered, {left} pending.")
        self.stdout.write(
            "\nDone. Inspect the runs: `manage.py runs_status`, or the admin at /admin/ "
            "(see the README)."
        )

    def _repositories(self) -> None:
        """Steps 4-6: the example project's own tracked models."""
        self._heading("4. Your own models: repositories and owners (sync_repositories)")
        call_command("sync_repositories", stdout=self.stdout)
        sample = SampleSource(SAMPLE_SOURCE)
        expected = (sum(map(len, sample.owners())), sum(map(len, sample.repositories())))
        if self._tables() != expected:
            raise CommandError(f"the full sync left {self._tables()}, not {expected}", returncode=1)

        self._heading(
            "5. The source fails between two pages (sync_repositories --fail-after-page 2)"
        )
        before_content = self._content()
        self.stdout.write(f"   Before: {self._counts()}.")
        try:
            call_command("sync_repositories", "--fail-after-page", "2", stdout=self.stdout)
        except CommandError as refusal:
            self.stdout.write(f"   -> {refusal} (as intended)")
        else:
            raise CommandError("the failing repositories sync did not fail", returncode=1)
        run = services.latest_run(SCOPE)
        if run is None or run.state.status != RunStatus.FAILED:
            raise CommandError("the failing repositories sync did not fail its run", returncode=1)
        if self._content() != before_content:
            raise CommandError("rows were lost or changed after a failed flush", returncode=1)
        self.stdout.write(f"   After:  {self._counts()}: not one row lost.")

        self._heading("6. The source dropped 5 repositories (sync_repositories --drop 5)")
        before = self._rows()
        before_rows = self._repository_rows()
        call_command("sync_repositories", "--drop", "5", stdout=self.stdout)
        dropped = set(SampleSource(SAMPLE_SOURCE, drop=5).dropped_ids())
        gone = before[1] - self._rows()[1]
        run = services.latest_run(SCOPE)
        audited = {
            row["github_id"]
            for event in RunEvent.objects.filter(run=run, type="repositories.removed")
            for row in event.payload["rows"]
        }
        if gone != dropped or audited != dropped or self._rows()[0] != before[0]:
            raise CommandError(
                f"cleanup removed {sorted(gone)} (audited {sorted(audited)}), "
                f"not exactly the dropped {sorted(dropped)}",
                returncode=1,
            )
        self.stdout.write(
            f"   -> removed exactly the {len(gone)} dropped repositories "
            f"(github ids {', '.join(map(str, sorted(gone)))}); their rows are in "
            "repositories.removed events."
        )
        if run is None:
            raise CommandError("the drop's sync left no run", returncode=1)
        self._undo(run.pk, before_rows)
        self._approve()

    def _undo(self, run_id: str, before: dict[int, tuple[Any, ...]]) -> None:
        """Step 7: the drop's cleanup undone; every row back as it was, primary key included."""
        self._heading(
            f"7. That cleanup was wrong: undo it (restore_cleanup --run {run_id} "
            f"--model {REPOSITORY})"
        )
        call_command(
            "restore_cleanup",
            "--run",
            run_id,
            "--model",
            REPOSITORY,
            "--by",
            "demo",
            stdout=self.stdout,
        )
        if self._repository_rows() != before:
            raise CommandError("the restore did not bring every row back as it was", returncode=1)
        self.stdout.write(
            f"   -> {self._counts()}: every restored row has its primary key and values back."
        )

    def _approve(self) -> None:
        """Step 8: a mass deletion withheld, then approved for the size shown."""
        self._heading("8. The source lost 200 repositories (sync_repositories --drop 200)")
        try:
            call_command("sync_repositories", "--drop", "200", stdout=self.stdout)
        except CommandError as refusal:
            self.stdout.write(f"   -> {refusal} (as intended)")
        else:
            raise CommandError("the mass deletion was not withheld", returncode=1)
        run = services.latest_run(SCOPE)
        if run is None:
            raise CommandError("the mass-deletion sync left no run", returncode=1)
        line = RunModelState.objects.get(run=run, model=REPOSITORY.lower())
        if line.cleanup_reason != "too_many_deletions" or line.withheld_count != 200:
            raise CommandError(
                f"expected a withheld plan of 200, got {line.cleanup_reason} {line.withheld_count}",
                returncode=1,
            )
        self._heading(
            f"   An operator checks the plan and approves it (cleanup_old_projects --run "
            f"{run.pk} --model {REPOSITORY} --approve 200)"
        )
        call_command(
            "cleanup_old_projects",
            "--run",
            run.pk,
            "--model",
            REPOSITORY,
            "--approve",
            "200",
            "--by",
            "demo",
            stdout=self.stdout,
        )
        if Repository.objects.count() != 100:
            raise CommandError("the approved cleanup did not remove exactly 200", returncode=1)
        self.stdout.write(f"   -> {self._counts()}.")

    @staticmethod
    def _repository_rows() -> dict[int, tuple[Any, ...]]:
        return {
            row[0]: tuple(row[1:])
            for row in Repository.objects.values_list(
                "pk", "github_id", "owner", "name", "stars", "source_created_at"
            )
        }

    @staticmethod
    def _rows() -> tuple[set[int], set[int]]:
        return (
            set(Owner.objects.values_list("id", flat=True)),
            set(Repository.objects.values_list("github_id", flat=True)),
        )

    @staticmethod
    def _content() -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """Every owner and repository, as the source gave them (not the run stamps)."""
        return (
            list(Owner.objects.order_by("id").values_list("id", "login", "kind", "url")),
            list(
                Repository.objects.order_by("github_id").values_list(
                    "github_id",
                    "owner",
                    "name",
                    "url",
                    "stars",
                    "archived",
                    "language",
                    "source_created_at",
                )
            ),
        )

    @staticmethod
    def _tables() -> tuple[int, int]:
        return Owner.objects.count(), Repository.objects.count()

    def _counts(self) -> str:
        owners, repositories = self._tables()
        return f"{owners} owner(s), {repositories} repositories"

    def _heading(self, title: str) -> None:
        self.stdout.write(self.style.MIGRATE_HEADING(f"\n{title}"))

    def _step(self, title: str, scope: str, *arguments: str) -> None:
        self.stdout.write(
            self.style.MIGRATE_HEADING(f"\n{title} ({' '.join(('sync_projects', *arguments))})")
        )
        call_command("sync_projects", "--scope", scope, *arguments, stdout=self.stdout)
