"""``manage.py sync_repositories``: the example project's own tracked models synced, one whole
cycle.

A run (``track_run``, scope ``github``); the owners flushed page by page through one flush
session of ``Owner``, then the repositories through one session of ``Repository`` (their
``owner`` given by the source's owner id); completion, which fails the run if either flush
failed; then the safe cleanup of each model: repositories first, owners second (a repository
``PROTECT``s its owner). The source is the bundled sample ``example_project/data/
repositories.json`` (a subset of GitHub's API shape), served page by page; options simulate
the failures the guards exist for.

The repositories are listed as GitHub's ``GET /repositories?since=<id>`` lists them: in id order,
each page's cursor being the id of its last repository (``flush.write(rows, cursor=last_id)``).
A full run reads them all and so leaves the highest id as its cursor. ``--incremental`` reads
only the repositories after the cursor of the last *completed* run (``flush(...,
incremental=True)``): its repositories' cleanup is refused (``incremental_run``: it did not read
the others, so it cannot tell which are gone), which is expected and printed as skipped, and the
owners' cleanup is skipped (they are read whole, but a repository the run did not read may still
reference an owner the source no longer lists).

Exit 0 when the cycle finished cleanly, 1 when a flush failed, the run did not complete or a
cleanup refused (the summary says which, and what was kept), 2 on bad arguments.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.core.management.base import CommandError, CommandParser

from example_project.models import Owner, Repository
from runs_app import services
from runs_app.exceptions import CleanupRefused, FlushFailed, RunInProgress
from runs_app.management.argtypes import non_negative_int, positive_int
from runs_app.management.base import StrictCommand
from runs_app.models import FlushMode, RunModelState, RunStatus
from runs_app.tracking import TrackedModel, model_label

SAMPLE_SOURCE = Path(__file__).resolve().parents[2] / "data" / "repositories.json"

#: The run scope of this job. Both models are whole-table (``sync_scope = None``): the scope
#: names the job's runs (one active at a time, newer runs supersede older ones), not a slice of
#: the tables.
SCOPE = "github"

#: Cleanups whose refusal is about this model's rows only (the run itself completed): after
#: such a refusal of the repositories, stale repositories remain, and cleaning up their owners
#: would run into the ``PROTECT`` foreign key, so owners are left alone.
ROW_REFUSALS = frozenset({"empty_run", "too_many_deletions"})

#: The repositories' cleanup refusal an incremental run expects: not a problem.
INCREMENTAL_REFUSAL = "incremental_run"


class SourceFailed(Exception):
    """The simulated source failure of ``--fail-after-page``: an API dropping the connection."""


@dataclass(frozen=True)
class SampleSource:
    """The sample, served as a paginated API: each listing is a generator of pages, and a page
    is fetched whole before the job writes it, so a failing source fails *between* two writes.
    Repositories are listed in id order, whatever the order of the file (``since`` relies on it).

    ``drop``: the source no longer lists its last ``drop`` repositories (by id).
    ``fail_after_page``: the repositories listing raises ``SourceFailed`` after that many
    pages (0: before the first one).
    """

    path: Path
    page_size: int = 100
    drop: int = 0
    fail_after_page: int | None = None

    def _load(self) -> dict[str, list[dict[str, Any]]]:
        data: dict[str, list[dict[str, Any]]] = json.loads(self.path.read_text(encoding="utf-8"))
        return data

    def owners(self) -> Iterator[list[dict[str, Any]]]:
        records = self._load()["owners"]
        for start in range(0, len(records), self.page_size):
            yield records[start : start + self.page_size]

    def _all_repositories(self) -> list[dict[str, Any]]:
        """Every repository of the file, in id order."""
        return sorted(self._load()["repositories"], key=lambda record: int(record["id"]))

    def repositories(self, since: int | None = None) -> Iterator[list[dict[str, Any]]]:
        """The repositories listing, as ``GET /repositories?since=<id>``: those whose id is
        greater than ``since`` (all of them when None), in id order."""
        records = self._all_repositories()
        records = records[: max(len(records) - self.drop, 0)]
        if since is not None:
            records = [record for record in records if record["id"] > since]
        for number, start in enumerate(range(0, len(records), self.page_size)):
            if self.fail_after_page is not None and number >= self.fail_after_page:
                raise SourceFailed(
                    f"source connection lost after {self.fail_after_page} page(s) of repositories"
                )
            yield records[start : start + self.page_size]

    def dropped_ids(self) -> list[int]:
        """The ids of the repositories ``drop`` leaves out (what cleanup should remove)."""
        records = self._all_repositories()
        return [record["id"] for record in records[max(len(records) - self.drop, 0) :]]


def owner_row(record: dict[str, Any]) -> dict[str, Any]:
    """A source owner as an ``Owner`` row: field name -> value."""
    return {
        "id": record["id"],
        "login": record["login"],
        "kind": record["type"],
        "url": record["html_url"],
    }


def repository_row(record: dict[str, Any]) -> dict[str, Any]:
    """A source repository as a ``Repository`` row. The foreign key by id (``"owner": id``);
    the timestamp as the source's ISO text, which the model's field converts."""
    return {
        "github_id": record["id"],
        "owner": record["owner"]["id"],
        "name": record["name"],
        "url": record["html_url"],
        "stars": record["stargazers_count"],
        "archived": record["archived"],
        "language": record["language"] or "",  # null on the source; the field takes text
        "source_created_at": record["created_at"],
    }


class Command(StrictCommand):
    help = (
        "Sync the sample repositories and their owners (the example project's own tracked "
        "models): a run, one flush session per model page by page, completion, safe cleanup "
        "of each model, summary. --incremental reads only the repositories after the last "
        "completed run's cursor. Exit 1 if a flush failed, the run failed or a cleanup refused."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--page-size", type=positive_int, default=100, help="records per page (100)"
        )
        parser.add_argument(
            "--source", type=Path, default=SAMPLE_SOURCE, help="a JSON sample like the bundled one"
        )
        parser.add_argument(
            "--fail-after-page",
            type=non_negative_int,
            metavar="N",
            help="simulate the source failing after N pages of repositories, between two pages",
        )
        parser.add_argument(
            "--drop",
            type=non_negative_int,
            default=0,
            metavar="N",
            help="the source omits its last N repositories (cleanup removes exactly those)",
        )
        parser.add_argument(
            "--incremental",
            action="store_true",
            help="read only the repositories after the cursor of the last completed run (their "
            "id, as GitHub's ?since=); their cleanup and the owners' are skipped",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="sync and complete, but only plan the cleanups: print what they would remove "
            "or why they would refuse, delete nothing",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        source = SampleSource(
            options["source"],
            page_size=options["page_size"],
            drop=options["drop"],
            fail_after_page=options["fail_after_page"],
        )
        dry_run: bool = options["dry_run"]
        incremental: bool = options["incremental"]
        problems: list[str] = []
        metadata: dict[str, Any] = {"job": "sync_repositories"}
        if incremental:
            metadata["incremental"] = True
        try:
            # Leaving the block completes the run; complete_run is fail-safe across models: a
            # failed (or unfinished) flush of either model makes the run failed, never completed.
            with services.track_run(SCOPE, metadata=metadata) as run:
                how = "; repositories read incrementally" if incremental else ""
                self.stdout.write(f"Run {run.pk} started (scope {SCOPE!r}{how}).")
                # Owners are a small table: always read whole.
                owners_ok = self._flush(
                    run.pk, Owner, lambda _: source.owners(), owner_row, problems
                )
                if owners_ok:
                    self._flush(
                        run.pk,
                        Repository,
                        source.repositories,
                        repository_row,
                        problems,
                        incremental=incremental,
                        cursor=lambda page: page[-1]["id"],
                    )
                else:
                    self.stdout.write("Repositories: not synced (the owners' flush failed).")
        except RunInProgress as exc:
            raise CommandError(str(exc), returncode=1) from exc

        self._summary(run.pk, problems)

        expected = frozenset({INCREMENTAL_REFUSAL}) if incremental else frozenset()
        removed, refusal = self._cleanup(run.pk, Repository, dry_run, problems, expected)
        if incremental:
            self.stdout.write(
                "Cleanup of owners: skipped: an incremental run does not clean up repositories, "
                "and a repository it did not read may still reference an owner the source no "
                "longer lists."
            )
        elif refusal in ROW_REFUSALS:
            self.stdout.write(
                "Cleanup of owners: skipped: the stale repositories were kept, and an owner "
                "cannot be removed while it owns one."
            )
        else:
            removed += self._cleanup(run.pk, Owner, dry_run, problems)[0]

        kept = " Nothing was deleted." if problems and not removed else ""
        self.stdout.write(
            f"Tables: {Owner.objects.count()} owner(s), "
            f"{Repository.objects.count()} repositories.{kept}"
        )
        if problems:
            raise CommandError(f"sync incomplete: {'; '.join(problems)}", returncode=1)

    def _flush(
        self,
        run_id: str,
        model: type[TrackedModel],
        listing: Callable[[Any], Iterator[list[dict[str, Any]]]],
        to_row: Callable[[dict[str, Any]], dict[str, Any]],
        problems: list[str],
        *,
        incremental: bool = False,
        cursor: Callable[[list[dict[str, Any]]], Any] | None = None,
    ) -> bool:
        """Every page of one listing through one flush session of ``model``: its flush succeeds
        only if the block is left normally, after the last page. A source failing between two
        pages escapes the block, which records this model's flush failed and raises
        ``FlushFailed``. Returns whether the flush succeeded.

        ``listing(since)``: the source's pages after ``since`` (None: from the start; an
        incremental flush gives it the last completed run's cursor). ``cursor(page)``: the
        cursor each page is written with (the run's cursor is its last page's)."""
        name = str(model._meta.verbose_name_plural)
        self.stdout.write(f"{name.capitalize()}{' (incremental)' if incremental else ''}:")
        written = 0  # pages written: a failure is on the next one (fetching or writing it)
        try:
            with services.flush(run_id, model, incremental=incremental) as flush:
                since = self._starting_point(flush) if incremental else None
                for number, page in enumerate(listing(since), 1):
                    rows = [to_row(record) for record in page]
                    if cursor is None:
                        result = flush.write(rows)
                    else:
                        result = flush.write(rows, cursor=cursor(page))
                    written = number
                    self.stdout.write(
                        f"  page {number}: {result.seen} flushed ({result.created} created, "
                        f"{result.updated} updated), {flush.result.seen} so far"
                    )
        except FlushFailed as exc:
            self.stdout.write(f"  page {written + 1}: FLUSH FAILED: {exc}")
            problems.append(f"{name} flush failed")
            return False
        return True

    def _starting_point(self, flush: services.FlushSession) -> int | None:
        """Where an incremental read of the repositories starts (said on the output): the
        cursor of the newest completed run that set one, never a failed run's."""
        since = flush.cursor
        if since is None:
            self.stdout.write("  no completed run set a cursor: reading from the start")
            return None
        if not isinstance(since, int) or isinstance(since, bool):
            # Raised in the block: the flush fails with this message, nothing is read.
            raise ValueError(
                f"the cursor of run {flush.cursor_run} is {since!r}, not a repository id"
            )
        self.stdout.write(f"  resuming after repository id {since}, from run {flush.cursor_run}")
        return since

    def _summary(self, run_id: str, problems: list[str]) -> None:
        state = services.get_run(run_id).state
        completed = state.status == RunStatus.COMPLETED
        if completed:
            self.stdout.write(f"Run {run_id}: completed.")
        else:
            self.stdout.write(f"Run {run_id}: {state.status} ({state.error}).")
            problems.append(f"run {state.status}")
        lines = {line.model: line for line in RunModelState.objects.filter(run_id=run_id)}
        for model in (Owner, Repository):
            line = lines.get(model_label(model))
            name = f"{model._meta.verbose_name_plural}:"
            if line is None:
                self.stdout.write(f"  {name:<14}not flushed")
                continue
            mode = " (incremental)" if line.flush_mode == FlushMode.INCREMENTAL else ""
            self.stdout.write(
                f"  {name:<14}flush {line.flush_status}{mode}, {line.rows_seen} seen "
                f"({line.rows_created} created, {line.rows_updated} updated), "
                f"{line.rows_confirmed} confirmed"
            )
            if line.cursor is not None:
                use = (
                    "the next incremental run resumes after it"
                    if completed
                    else "not a starting point: the run did not complete"
                )
                self.stdout.write(f"  {'':<14}cursor {json.dumps(line.cursor)}: {use}")

    def _cleanup(
        self,
        run_id: str,
        model: type[TrackedModel],
        dry_run: bool,
        problems: list[str],
        expected: frozenset[str] = frozenset(),
    ) -> tuple[int, str | None]:
        """The safe cleanup of ``model`` for the run (planned only, for a dry run). Returns the
        rows removed and, if it refused (or would refuse) or failed, the reason. A refusal in
        ``expected`` is printed as skipped and is not a problem."""
        name = str(model._meta.verbose_name_plural)
        dry = " (dry run)" if dry_run else ""
        try:
            result = services.safe_cleanup(run_id, model, dry_run=dry_run)
        except CleanupRefused as exc:
            if exc.reason in expected:
                self.stdout.write(f"Cleanup of {name}{dry}: skipped: {exc.reason}: {exc.message}")
                return 0, exc.reason
            self.stdout.write(f"Cleanup of {name} refused: {exc.reason}: {exc.message}")
            problems.append(f"{name} cleanup refused ({exc.reason})")
            return 0, exc.reason
        if not dry_run:
            self.stdout.write(
                f"Cleanup of {name}: removed {result.removed} no longer in the source."
            )
            return result.removed, None
        sample = f" (e.g. {', '.join(map(str, result.sample_keys))})" if result.sample_keys else ""
        if result.refusal in expected:
            self.stdout.write(
                f"Cleanup of {name}{dry}: skipped: {result.refusal}: {result.refusal_message}"
            )
            return 0, result.refusal
        if result.refusal is not None:
            self.stdout.write(
                f"Cleanup of {name} (dry run): would refuse: {result.refusal}: "
                f"{result.refusal_message}; it plans {result.planned}{sample}. Nothing deleted."
            )
            problems.append(f"{name} cleanup would refuse ({result.refusal})")
            return 0, result.refusal
        self.stdout.write(
            f"Cleanup of {name} (dry run): would remove {result.planned}{sample}. Nothing deleted."
        )
        return 0, None
