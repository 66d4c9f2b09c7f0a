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
7. ``drain_outbox --once``: every event of the six runs leaves through the outbox.

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
from runs_app.models import Project, RunEvent, RunStatus


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
            self.style.MIGRATE_HEADING("\n7. Deliver the events (drain_outbox --once)")
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
