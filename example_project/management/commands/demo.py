"""``manage.py demo``: the README's main job. Nine sync cycles, an undone cleanup, an approved
one and a relay pass, so every guarantee shows once on a fresh database:

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
9. ``sync_repositories --incremental``: only the repositories after the last completed run's
   cursor (step 8's, which read the first 100): one that fails after a page (the run fails, and
   its cursor is never a starting point), then one that resumes from step 8's cursor, not the
   failed run's, and reads the other 200; its cleanup is skipped (``incremental_run``);
10. ``drain_outbox --once``: every event of the nine runs leaves through the outbox.

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
from runs_app.models import CleanupStatus, FlushMode, Project, RunEvent, RunModelState, RunStatus

REPOSITORY = "example_project.Repository"


class Command(StrictCommand):
    help = (
        "The example project's tour: projects and the project's own repositories, each synced, "
        "synced with removals and synced from a failing source; the repositories read "
        "incrementally, resuming after a failed run; then drain the outbox."
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
            self.style.MIGRATE_HEADING("\n10. Deliver the events (drain_outbox --once)")
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
        """Steps 4-9: the example project's own tracked models."""
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
        self._incremental()

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

    def _incremental(self) -> None:
        """Step 9: incremental reads. A failed run's cursor is never a starting point: the
        sync after it resumes from the last completed run's cursor."""
        self._heading(
            "9. Incremental: only the repositories after the last completed run's cursor "
            "(sync_repositories --incremental)"
        )
        sample = SampleSource(SAMPLE_SOURCE)
        ids = [record["id"] for page in sample.repositories() for record in page]
        start = services.latest_run(SCOPE)
        if start is None or start.state.status != RunStatus.COMPLETED:
            raise CommandError("step 8 left no completed run to resume from", returncode=1)
        start_cursor = self._cursor(start.pk)
        held = sorted(Repository.objects.values_list("github_id", flat=True))
        if start_cursor != held[-1] or held != ids[: len(held)]:
            raise CommandError(
                f"step 8's run has cursor {start_cursor}, not its last repository id {held[-1]}",
                returncode=1,
            )
        self.stdout.write(
            f"   The last completed run, {start.pk}, read the first {len(held)} repositories: its "
            f"cursor is repository id {start_cursor}, the highest it read."
        )

        self._heading(
            "   a) The source fails after one page (sync_repositories --incremental "
            "--fail-after-page 1)"
        )
        try:
            call_command(
                "sync_repositories", "--incremental", "--fail-after-page", "1", stdout=self.stdout
            )
        except CommandError as refusal:
            self.stdout.write(f"   -> {refusal} (as intended)")
        else:
            raise CommandError("the failing incremental sync did not fail", returncode=1)
        failed = services.latest_run(SCOPE)
        if failed is None or failed.state.status != RunStatus.FAILED:
            raise CommandError("the failing incremental sync did not fail its run", returncode=1)
        failed_cursor = self._cursor(failed.pk)
        page = ids[len(held) : len(held) + 100]
        if failed_cursor != page[-1]:
            raise CommandError(
                f"the failed run's cursor is {failed_cursor}, not the last id of the page it "
                f"wrote ({page[-1]})",
                returncode=1,
            )
        self.stdout.write(
            f"   -> run {failed.pk} failed after writing {len(page)} repositories; its cursor "
            f"(repository id {failed_cursor}) is not a starting point."
        )

        self._heading(
            "   b) The next sync resumes from the last completed run (sync_repositories "
            "--incremental)"
        )
        call_command("sync_repositories", "--incremental", stdout=self.stdout)
        resumed = services.latest_run(SCOPE)
        if resumed is None or resumed.state.status != RunStatus.COMPLETED:
            raise CommandError("the resuming incremental sync did not complete", returncode=1)
        line = RunModelState.objects.get(run=resumed, model=REPOSITORY.lower())
        read = set(
            Repository.objects.filter(last_seen_run=resumed).values_list("github_id", flat=True)
        )
        rest = ids[len(held) :]
        checks = {
            "flush_mode": (line.flush_mode, FlushMode.INCREMENTAL),
            "repositories read": (sorted(read), rest),
            "rows (created, updated)": (
                (line.rows_created, line.rows_updated),
                (len(rest) - len(page), len(page)),
            ),
            "cursor": (line.cursor, ids[-1]),
            "cleanup": (
                (line.cleanup_status, line.cleanup_reason),
                (CleanupStatus.REFUSED, "incremental_run"),
            ),
            "tables": (self._tables(), (sum(map(len, sample.owners())), len(ids))),
        }
        wrong = {name: got for name, (got, want) in checks.items() if got != want}
        if wrong:
            raise CommandError(f"the resumed incremental sync is off: {wrong}", returncode=1)
        self.stdout.write(
            f"   -> resumed after repository id {start_cursor} (run {start.pk}'s cursor, not the "
            f"failed run's {failed_cursor}): read exactly the {len(rest)} repositories after it "
            f"({len(page)} updated: those the failed run had written; "
            f"{len(rest) - len(page)} created); its cursor is now {line.cursor}. Its cleanup "
            f"was skipped (incremental_run): {self._counts()}."
        )

    @staticmethod
    def _cursor(run_id: str) -> Any:
        """The repositories' cursor a run set (None if it set none)."""
        return (
            RunModelState.objects.filter(run_id=run_id, model=REPOSITORY.lower())
            .values_list("cursor", flat=True)
            .first()
        )

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
