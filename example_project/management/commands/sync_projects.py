"""``manage.py sync_projects``: the example project's main job, one whole sync cycle.

A run (``track_run``), the source flushed page by page through one flush session,
completion, safe cleanup of the projects the source no longer lists, and a summary. The source
is the bundled sample ``example_project/data/projects.json`` (500 projects); options simulate the
failures the guards exist for. Exit 0 when the cycle finished cleanly, 1 when the flush failed,
the run did not complete or cleanup refused (the summary says which, and what was kept).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

from django.core.management.base import CommandError, CommandParser

from runs_app import services
from runs_app.exceptions import CleanupRefused, FlushFailed, RunInProgress
from runs_app.management.argtypes import non_negative_int, positive_int
from runs_app.management.base import StrictCommand
from runs_app.models import Project, RunStatus

SAMPLE_SOURCE = Path(__file__).resolve().parents[2] / "data" / "projects.json"


class SourceFailed(Exception):
    """The simulated source failure of ``--fail-after``, e.g. an API dropping the connection."""


def sample_source(
    path: Path, *, empty: bool = False, remove: int = 0, fail_after: int | None = None
) -> Iterator[Mapping[str, Any]]:
    """The sample source, as a scan would deliver it: one project at a time.

    ``empty``: the source returns nothing. ``remove``: it no longer lists its last ``remove``
    projects. ``fail_after``: it raises ``SourceFailed`` after delivering that many projects.
    """
    if empty:
        return
    projects = json.loads(path.read_text(encoding="utf-8"))
    if remove:
        projects = projects[: max(len(projects) - remove, 0)]
    for index, project in enumerate(projects):
        if fail_after is not None and index >= fail_after:
            raise SourceFailed(f"source connection lost after {fail_after} projects")
        yield project


def pages(source: Iterator[Mapping[str, Any]], size: int) -> Iterator[list[Mapping[str, Any]]]:
    """The source fetched page by page, as an API client does: a page is read whole before it
    is written, so a source failing mid-scan fails *between* two writes (the job shape the flush
    session exists for)."""
    while page := list(islice(source, size)):
        yield page


class Command(StrictCommand):
    help = (
        "Sync the sample source into a scope: run, flush page by page, complete, safe "
        "cleanup, summary. Exit 1 if the flush failed or cleanup refused."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--scope", default="example", help="the scope to sync (example)")
        parser.add_argument(
            "--page-size", type=positive_int, default=100, help="projects per page (100)"
        )
        parser.add_argument(
            "--source", type=Path, default=SAMPLE_SOURCE, help="a JSON list of projects"
        )
        parser.add_argument(
            "--fail-after",
            type=non_negative_int,
            metavar="N",
            help="simulate the source failing after N projects, mid-scan",
        )
        parser.add_argument("--empty", action="store_true", help="the source returns nothing")
        parser.add_argument(
            "--remove",
            type=non_negative_int,
            default=0,
            metavar="N",
            help="the source omits its last N projects (cleanup removes them)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        scope: str = options["scope"]
        source = sample_source(
            options["source"],
            empty=options["empty"],
            remove=options["remove"],
            fail_after=options["fail_after"],
        )
        problems: list[str] = []
        try:
            # Leaving the block completes the run. complete_run is fail-safe: after a failed
            # flush the run ends as failed, never completed, although the job carried on.
            with services.track_run(scope, metadata={"job": "sync_projects"}) as run:
                self.stdout.write(f"Run {run.pk} started (scope {scope!r}).")
                self._flush(run.pk, pages(source, options["page_size"]), problems)
        except RunInProgress as exc:
            raise CommandError(str(exc), returncode=1) from exc

        state = services.get_run(run.pk).state
        if state.status == RunStatus.COMPLETED:
            self.stdout.write(
                f"Run {run.pk}: completed; flush {state.flush_status}, {state.rows_seen} seen "
                f"({state.rows_created} created, {state.rows_updated} updated), "
                f"{state.rows_confirmed} confirmed."
            )
        else:
            self.stdout.write(f"Run {run.pk}: {state.status} ({state.error}).")
            problems.append(f"run {state.status}")

        try:
            cleanup = services.safe_cleanup_old_projects(run.pk)
            self.stdout.write(
                f"Cleanup: removed {cleanup.removed} project(s) no longer in the source."
            )
        except CleanupRefused as exc:
            self.stdout.write(f"Cleanup refused: {exc.reason}: {exc.message}")
            problems.append(f"cleanup refused ({exc.reason})")

        count = Project.objects.filter(scope=scope).count()
        kept = " Nothing was deleted." if problems else ""
        self.stdout.write(f"Scope {scope!r} holds {count} project(s).{kept}")
        if problems:
            raise CommandError(f"sync incomplete: {'; '.join(problems)}", returncode=1)

    def _flush(
        self, run_id: str, source_pages: Iterator[list[Mapping[str, Any]]], problems: list[str]
    ) -> None:
        """Every page through one flush session: the run's flush succeeds only if the session
        is left normally, after the last page. A source failing between two pages escapes the
        block, which records the flush failed and raises ``FlushFailed``."""
        number = 0
        try:
            with services.flush(run_id) as flush:
                for number, page in enumerate(source_pages, 1):
                    result = flush.write(page)
                    self.stdout.write(
                        f"  page {number}: {result.seen} project(s) flushed "
                        f"({result.created} created, {result.updated} updated), "
                        f"{flush.result.seen} so far"
                    )
        except FlushFailed as exc:
            self.stdout.write(f"  page {number + 1}: FLUSH FAILED: {exc}")
            problems.append("flush failed")
