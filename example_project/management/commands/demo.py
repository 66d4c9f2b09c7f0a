"""``manage.py demo``: the README's main job. Three sync cycles and a relay pass, so every
guarantee shows once on a fresh database:

1. ``sync_projects``: a full sync of the sample source (500 projects);
2. ``sync_projects --remove 5``: the source no longer lists 5 projects; cleanup removes exactly
   those, and their rows travel in ``projects.removed`` events;
3. ``sync_projects --fail-after 250``: the source fails between two pages; the run ends
   ``failed`` (never ``completed``), cleanup refuses with ``flush_failed``, and no project is
   lost;
4. ``drain_outbox --once``: every event of the three runs leaves through the outbox.

Exit 0 when each step behaved as the guarantees say, 1 otherwise.
"""

from __future__ import annotations

from typing import Any

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from runs_app.models import Project, RunEvent


class Command(BaseCommand):
    help = "The example project's tour: sync, sync with removals, a failing sync, drain the outbox."

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

        self.stdout.write(
            self.style.MIGRATE_HEADING("\n4. Deliver the events (drain_outbox --once)")
        )
        pending = RunEvent.objects.filter(published_at__isnull=True).count()
        call_command("drain_outbox", "--once", stdout=self.stdout, stderr=self.stderr)
        left = RunEvent.objects.filter(published_at__isnull=True, skipped_at__isnull=True).count()
        self.stdout.write(f"   -> {pending - left} event(s) delivered, {left} pending.")
        self.stdout.write(
            "\nDone. Inspect the runs: `manage.py runs_status`, or the admin at /admin/ "
            "(see the README)."
        )

    def _step(self, title: str, scope: str, *arguments: str) -> None:
        self.stdout.write(
            self.style.MIGRATE_HEADING(f"\n{title} (sync_projects {' '.join(arguments)})")
        )
        call_command("sync_projects", "--scope", scope, *arguments, stdout=self.stdout)
