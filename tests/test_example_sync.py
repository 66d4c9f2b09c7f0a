"""``manage.py sync_repositories``: the example project's own tracked models (Owner, Repository)
synced through flush sessions, page by page; output, exit codes, and what each run leaves in
the tables, the per-model ledgers and the events."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from example_project.data import generate_repositories
from example_project.management.commands import sync_repositories
from example_project.management.commands.sync_repositories import (
    SAMPLE_SOURCE,
    SCOPE,
    SampleSource,
)
from example_project.models import Owner, Repository
from runs_app import services
from runs_app.db import column
from runs_app.models import CleanupStatus, FlushStatus, Run, RunEvent, RunModelState, RunStatus
from tests.helpers import shell_parser
from tests.test_data_commands import manage

# Real commits, as when the job runs: flush sessions, completion and each cleanup batch are
# transactions of their own, and foreign keys are checked when they commit.
pytestmark = pytest.mark.django_db(transaction=True)

SAMPLE = json.loads(SAMPLE_SOURCE.read_text(encoding="utf-8"))
OWNERS = len(SAMPLE["owners"])
REPOSITORIES = len(SAMPLE["repositories"])
IDS = [record["id"] for record in SAMPLE["repositories"]]  # in id order (checked below)
REPOSITORY = "example_project.repository"


def sync(*args: str) -> str:
    out = StringIO()
    call_command("sync_repositories", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def sync_failing(*args: str) -> tuple[CommandError, str]:
    out = StringIO()
    with pytest.raises(CommandError) as caught:
        call_command("sync_repositories", *args, stdout=out, stderr=StringIO())
    return caught.value, out.getvalue()


def latest() -> Run:
    run = services.latest_run(SCOPE)
    assert run is not None
    return run


def lines(run: Run) -> dict[str, RunModelState]:
    return {line.model: line for line in RunModelState.objects.filter(run=run)}


def content() -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every owner and repository as the source gave them (not the run stamps)."""
    return (
        list(Owner.objects.order_by("id").values_list("id", "login", "kind", "url")),
        list(
            Repository.objects.order_by("github_id").values_list(
                "github_id", "owner", "name", "url", "stars", "archived", "language",
                "source_created_at",
            )
        ),
    )  # fmt: skip


def restore(record: dict[str, Any]) -> Repository:
    """A deleted repository put back from its audit record (column -> value), each value
    through the model's field."""
    return Repository(
        **{
            field.attname: field.to_python(record[column(field)])
            for field in Repository._meta.concrete_fields
        }
    )


def test_the_sample_is_a_few_hundred_repositories_of_a_few_dozen_owners() -> None:
    owners = {owner["id"] for owner in SAMPLE["owners"]}
    ids = [repository["id"] for repository in SAMPLE["repositories"]]
    assert (len(owners), len(ids)) == (36, 300)
    assert ids == sorted(set(ids))
    assert {repository["owner"]["id"] for repository in SAMPLE["repositories"]} <= owners
    # Committed as generated: regenerating gives the same file.
    expected = generate_repositories.render(generate_repositories.generate())
    assert SAMPLE_SOURCE.read_text(encoding="utf-8") == expected


def test_a_full_sync_then_an_update() -> None:
    first = sync()

    run = latest()
    assert first.startswith(f"Run {run.pk} started (scope 'github').\nOwners:\n")
    assert "  page 1: 36 flushed (36 created, 0 updated), 36 so far\nRepositories:\n" in first
    assert "  page 3: 100 flushed (100 created, 0 updated), 300 so far\n" in first
    assert (
        f"Run {run.pk}: completed.\n"
        "  owners:       flush succeeded, 36 seen (36 created, 0 updated), 36 confirmed\n"
        "  repositories: flush succeeded, 300 seen (300 created, 0 updated), 300 confirmed\n"
        f"                cursor {IDS[-1]}: the next incremental run resumes after it\n"
        "Cleanup of repositories: removed 0 no longer in the source.\n"
        "Cleanup of owners: removed 0 no longer in the source.\n"
        "Tables: 36 owner(s), 300 repositories.\n"
    ) in first
    assert (Owner.objects.count(), Repository.objects.count()) == (OWNERS, REPOSITORIES)
    assert not Repository.objects.exclude(last_confirmed_run=run).exists()
    assert not Owner.objects.exclude(last_seen_run=run).exists()
    ledger = lines(run)
    assert set(ledger) == {"example_project.owner", "example_project.repository"}
    assert all(line.cleanup_status == CleanupStatus.DONE for line in ledger.values())
    flushed = RunEvent.objects.filter(run=run, type__endswith=".flushed")
    assert (
        sorted(flushed.values_list("type", flat=True))
        == ["owners.flushed"] + ["repositories.flushed"] * 3
    )

    second = sync("--page-size", "250")
    assert second.count("  page ") == 3  # owners 1, repositories 2: no empty page
    assert "repositories: flush succeeded, 300 seen (0 created, 300 updated), 300 confirmed" in (
        second
    )


def test_values_are_typed_by_the_models_fields() -> None:
    sync()
    record = SAMPLE["repositories"][0]
    repository = Repository.objects.select_related("owner").get(github_id=record["id"])
    assert repository.owner_id == record["owner"]["id"]
    assert repository.owner.login == record["owner"]["login"]
    assert repository.stars == record["stargazers_count"]
    assert repository.url == record["html_url"]
    assert repository.source_created_at == datetime.strptime(
        record["created_at"], "%Y-%m-%dT%H:%M:%SZ"
    ).replace(tzinfo=UTC)
    no_language = [r["id"] for r in SAMPLE["repositories"] if r["language"] is None]
    assert no_language
    assert set(Repository.objects.filter(language="").values_list("github_id", flat=True)) == set(
        no_language
    )
    archived = {r["id"] for r in SAMPLE["repositories"] if r["archived"]}
    assert set(Repository.objects.filter(archived=True).values_list("github_id", flat=True)) == (
        archived
    )


def test_a_source_failing_between_two_pages_loses_nothing() -> None:
    sync()
    before = content()

    error, out = sync_failing("--fail-after-page", "2")

    run = latest()
    assert error.returncode == 1
    assert str(error) == (
        "sync incomplete: repositories flush failed; run failed; "
        "repositories cleanup refused (flush_failed); owners cleanup refused (flush_failed)"
    )
    assert (
        "  page 2: 100 flushed (0 created, 100 updated), 200 so far\n  page 3: FLUSH FAILED: "
        in (out)
    )
    assert "source connection lost after 2 page(s) of repositories" in out
    assert f"Run {run.pk}: failed (" in out
    assert "  owners:       flush succeeded, 36 seen" in out
    assert (
        "  repositories: flush failed, 200 seen (0 created, 200 updated), 0 confirmed\n"
        f"                cursor {IDS[199]}: not a starting point: the run did not complete\n"
    ) in out
    assert "Cleanup of repositories refused: flush_failed: " in out
    assert "Cleanup of owners refused: flush_failed: " in out
    assert out.endswith("Tables: 36 owner(s), 300 repositories. Nothing was deleted.\n")
    assert run.state.status == RunStatus.FAILED
    ledger = lines(run)
    owners, repositories = ledger["example_project.owner"], ledger["example_project.repository"]
    assert (owners.flush_status, repositories.flush_status) == (
        FlushStatus.SUCCEEDED,
        FlushStatus.FAILED,
    )
    # The run's view of the source is incomplete: neither model may clean up.
    assert (owners.cleanup_reason, repositories.cleanup_reason) == ("flush_failed", "flush_failed")
    assert content() == before  # not one row lost or changed
    assert not RunEvent.objects.filter(run=run, type__endswith=".removed").exists()


def test_a_failing_first_sync_keeps_the_pages_it_wrote_and_completes_nothing() -> None:
    error, out = sync_failing("--fail-after-page", "1")
    assert error.returncode == 1
    assert "Tables: 36 owner(s), 100 repositories. Nothing was deleted." in out
    assert not Repository.objects.filter(last_confirmed_run__isnull=False).exists()
    # The next sync completes and confirms everything.
    sync()
    assert Repository.objects.filter(last_confirmed_run=latest()).count() == REPOSITORIES


def test_cleanup_removes_exactly_what_the_source_dropped_with_an_audit_to_restore_it() -> None:
    sync()
    before = content()
    dropped = SampleSource(SAMPLE_SOURCE, drop=5).dropped_ids()
    assert dropped == [record["id"] for record in SAMPLE["repositories"][-5:]]

    out = sync("--drop", "5")

    assert "Cleanup of repositories: removed 5 no longer in the source." in out
    assert "Cleanup of owners: removed 0 no longer in the source." in out
    assert out.endswith("Tables: 36 owner(s), 295 repositories.\n")
    assert set(Repository.objects.values_list("github_id", flat=True)) == {
        record["id"] for record in SAMPLE["repositories"][:-5]
    }
    run = latest()
    assert lines(run)["example_project.repository"].rows_removed == 5
    events = RunEvent.objects.filter(run=run, type="repositories.removed")
    rows = [row for event in events for row in event.payload["rows"]]
    assert all(event.payload["model"] == "example_project.repository" for event in events)
    assert sorted(row["github_id"] for row in rows) == dropped
    # The audit carries every column: enough to put the rows back.
    columns = {field.column for field in Repository._meta.concrete_fields}
    assert all(set(row) == columns for row in rows)
    Repository.objects.bulk_create(restore(row) for row in rows)
    assert content() == before


def test_owners_are_cleaned_up_after_their_repositories(tmp_path: Path) -> None:
    sync()
    gone = SAMPLE["repositories"][0]["owner"]["id"]
    smaller = {
        "owners": [owner for owner in SAMPLE["owners"] if owner["id"] != gone],
        "repositories": [r for r in SAMPLE["repositories"] if r["owner"]["id"] != gone],
    }
    path = tmp_path / "smaller.json"
    path.write_text(json.dumps(smaller), encoding="utf-8")
    theirs = REPOSITORIES - len(smaller["repositories"])

    out = sync("--source", str(path))

    assert f"Cleanup of repositories: removed {theirs} no longer in the source." in out
    assert "Cleanup of owners: removed 1 no longer in the source." in out
    assert not Owner.objects.filter(id=gone).exists()
    assert Owner.objects.count() == OWNERS - 1
    assert Repository.objects.count() == len(smaller["repositories"])


def write_source(tmp_path: Path, repositories: list[dict[str, Any]]) -> str:
    path = tmp_path / "source.json"
    path.write_text(
        json.dumps({"owners": SAMPLE["owners"], "repositories": repositories}), encoding="utf-8"
    )
    return str(path)


def test_a_value_the_field_refuses_fails_the_flush_naming_the_row(tmp_path: Path) -> None:
    sync()
    before = content()
    repositories = [dict(record) for record in SAMPLE["repositories"]]
    repositories[149]["stargazers_count"] = -1  # page 2, row 49: a PositiveIntegerField
    repositories[149]["name"] = "renamed"

    error, out = sync_failing("--source", write_source(tmp_path, repositories))

    assert "  page 2: FLUSH FAILED: " in out
    assert "InvalidInput: repositories[49].stars: " in out
    assert str(error).startswith("sync incomplete: repositories flush failed; run failed; ")
    assert content() == before  # nothing of that batch was written, nothing deleted


def test_a_repository_of_an_unknown_owner_fails_the_flush(tmp_path: Path) -> None:
    sync()
    before = content()
    repositories = [dict(record) for record in SAMPLE["repositories"]]
    repositories[120] = {**repositories[120], "owner": {"id": 1, "login": "nobody"}}
    repositories[121] = {**repositories[121], "name": "renamed"}

    error, out = sync_failing("--source", write_source(tmp_path, repositories))

    assert "  page 2: FLUSH FAILED: " in out
    assert "IntegrityError" in out
    assert error.returncode == 1
    assert content() == before  # the batch rolled back as a whole, nothing deleted


def test_an_owner_still_referenced_is_not_deleted(tmp_path: Path) -> None:
    """An inconsistent source: it lists repositories of an owner it no longer lists. The
    owners' cleanup would delete a row a repository still points at: the database's foreign
    key (PROTECT) fails that batch, which rolls back: cleanup refuses with rows_referenced."""
    sync()
    before = content()
    orphaned = SAMPLE["repositories"][0]["owner"]["id"]
    path = tmp_path / "source.json"
    owners = [owner for owner in SAMPLE["owners"] if owner["id"] != orphaned]
    path.write_text(
        json.dumps({"owners": owners, "repositories": SAMPLE["repositories"]}), encoding="utf-8"
    )

    error, out = sync_failing("--source", str(path))

    assert "Cleanup of repositories: removed 0 no longer in the source." in out
    assert (
        "Cleanup of owners refused: rows_referenced: a batch of owners to delete holds a row" in out
    )
    assert str(error) == "sync incomplete: owners cleanup refused (rows_referenced)"
    assert content() == before


def test_dry_run_plans_and_deletes_nothing() -> None:
    sync()
    before = content()
    dropped = SampleSource(SAMPLE_SOURCE, drop=5).dropped_ids()

    out = sync("--drop", "5", "--dry-run")

    assert (
        "Cleanup of repositories (dry run): would remove 5 "
        f"(e.g. {', '.join(map(str, dropped))}). Nothing deleted."
    ) in out
    assert "Cleanup of owners (dry run): would remove 0. Nothing deleted." in out
    assert content() == before
    assert all(line.cleanup_status == CleanupStatus.NOT_RUN for line in lines(latest()).values())


def test_dry_run_says_why_a_cleanup_would_refuse() -> None:
    sync()
    error, out = sync_failing("--drop", "200", "--dry-run")
    assert error.returncode == 1
    assert "Cleanup of repositories (dry run): would refuse: too_many_deletions: " in out
    assert "Cleanup of owners: skipped" in out
    assert Repository.objects.count() == REPOSITORIES


def test_a_mass_deletion_is_refused_and_owners_are_left_alone() -> None:
    sync()
    before = content()
    error, out = sync_failing("--drop", "200")
    assert str(error) == "sync incomplete: repositories cleanup refused (too_many_deletions)"
    assert "Cleanup of repositories refused: too_many_deletions: " in out
    assert "Cleanup of owners: skipped: the stale repositories were kept" in out
    assert content() == before
    assert lines(latest())["example_project.owner"].cleanup_status == CleanupStatus.NOT_RUN


def test_an_empty_repositories_listing_is_refused() -> None:
    sync()
    error, out = sync_failing("--drop", str(REPOSITORIES))
    assert "repositories: flush succeeded, 0 seen" in out
    assert "Cleanup of repositories refused: empty_run: " in out
    assert error.returncode == 1
    assert Repository.objects.count() == REPOSITORIES


def test_a_run_in_progress_is_reported() -> None:
    active = services.create_run(SCOPE)
    error, _ = sync_failing()
    assert error.returncode == 1
    assert active.pk in str(error)
    assert not Repository.objects.exists()


@pytest.mark.parametrize(
    "args",
    [["--page-size", "0"], ["--drop", "-1"], ["--fail-after-page", "x"], ["--fail-after-page"]],
)
def test_argument_errors(args: list[str]) -> None:
    with pytest.raises(CommandError, match="Error: argument"):
        call_command("sync_repositories", *args)
    parser = shell_parser(sync_repositories.Command(), "sync_repositories")
    with pytest.raises(SystemExit) as caught:
        parser.parse_args(args)
    assert caught.value.code == 2
    assert not Run.objects.exists()


def test_exit_codes_from_a_real_process() -> None:
    done = manage("sync_repositories")
    failed = manage("sync_repositories", "--fail-after-page", "1")
    bad = manage("sync_repositories", "--drop", "many")
    incremental = manage("sync_repositories", "--incremental")

    assert done.returncode == 0, done.stderr
    assert "Tables: 36 owner(s), 300 repositories." in done.stdout
    assert failed.returncode == 1
    assert failed.stderr.startswith("CommandError: sync incomplete: repositories flush failed")
    assert bad.returncode == 2
    assert "'many' is not an integer" in bad.stderr
    # An incremental run's refused cleanup is expected: exit 0.
    assert incremental.returncode == 0, incremental.stderr
    assert f"  resuming after repository id {IDS[-1]}, from run " in incremental.stdout
    assert "Cleanup of repositories: skipped: incremental_run: " in incremental.stdout
    assert Repository.objects.count() == REPOSITORIES


# --- --incremental: the repositories after the last completed run's cursor -----------------


def test_a_full_run_sets_the_cursor_and_an_incremental_run_reads_only_the_new_ones() -> None:
    sync("--drop", "20")
    full = latest()
    assert lines(full)[REPOSITORY].cursor == IDS[-21]  # the highest id it read
    before = content()

    out = sync("--incremental")

    run = latest()
    assert out.startswith(
        f"Run {run.pk} started (scope 'github'; repositories read incrementally).\nOwners:\n"
        "  page 1: 36 flushed (0 created, 36 updated), 36 so far\n"
        "Repositories (incremental):\n"
        f"  resuming after repository id {IDS[-21]}, from run {full.pk}\n"
        "  page 1: 20 flushed (20 created, 0 updated), 20 so far\n"
        f"Run {run.pk}: completed.\n"
    )
    assert (
        "  repositories: flush succeeded (incremental), 20 seen (20 created, 0 updated), "
        "20 confirmed\n"
        f"                cursor {IDS[-1]}: the next incremental run resumes after it\n"
        f"Cleanup of repositories: skipped: incremental_run: run '{run.pk}' read "
        "example_project.repository incrementally"
    ) in out
    assert (
        "Cleanup of owners: skipped: an incremental run does not clean up repositories, and a "
        "repository it did not read may still reference an owner the source no longer lists.\n"
        "Tables: 36 owner(s), 300 repositories.\n"
    ) in out
    # Exactly the 20 "new" ones were read; the 280 others untouched, nothing removed.
    read = Repository.objects.filter(last_seen_run=run).values_list("github_id", flat=True)
    assert sorted(read) == IDS[-20:]
    assert content()[1][:280] == before[1]
    assert Repository.objects.filter(last_seen_run=full).count() == 280
    ledger = lines(run)
    repositories, owners = ledger[REPOSITORY], ledger["example_project.owner"]
    assert (repositories.flush_mode, owners.flush_mode) == ("incremental", "full")
    assert (repositories.cleanup_status, repositories.cleanup_reason) == (
        CleanupStatus.REFUSED,
        "incremental_run",
    )
    assert owners.cleanup_status == CleanupStatus.NOT_RUN  # skipped by the job, not refused
    assert run.metadata == {"job": "sync_repositories", "incremental": True}
    assert not RunEvent.objects.filter(run=run, type__endswith=".removed").exists()
    # The cursor travels in the flushed event of the page that set it.
    flushed = RunEvent.objects.get(run=run, type="repositories.flushed")
    assert flushed.payload["cursor"] == IDS[-1]

    # A full run after it reads everything and cleans up again.
    out = sync("--drop", "5")
    assert "Cleanup of repositories: removed 5 no longer in the source." in out
    assert lines(latest())[REPOSITORY].cursor == IDS[-6]


def test_a_first_incremental_run_reads_from_the_start_and_the_next_one_reads_nothing() -> None:
    first = sync("--incremental")
    assert "  no completed run set a cursor: reading from the start\n" in first
    assert "repositories: flush succeeded (incremental), 300 seen (300 created, 0 updated)" in first
    run = latest()
    assert lines(run)[REPOSITORY].cursor == IDS[-1]

    second = sync("--incremental")
    assert f"  resuming after repository id {IDS[-1]}, from run {run.pk}\n" in second
    assert "repositories: flush succeeded (incremental), 0 seen (0 created, 0 updated)" in second
    assert "Tables: 36 owner(s), 300 repositories.\n" in second
    assert not Repository.objects.filter(last_seen_run=latest()).exists()


def test_a_failed_runs_cursor_is_never_a_starting_point() -> None:
    sync("--drop", "150")
    start = latest()

    error, out = sync_failing("--incremental", "--fail-after-page", "1")

    failed = latest()
    assert failed.state.status == RunStatus.FAILED
    assert str(error) == (
        "sync incomplete: repositories flush failed; run failed; "
        "repositories cleanup refused (flush_failed)"
    )
    assert f"  resuming after repository id {IDS[149]}, from run {start.pk}\n" in out
    assert "  page 2: FLUSH FAILED: " in out
    assert f"cursor {IDS[249]}: not a starting point: the run did not complete\n" in out
    assert "Cleanup of owners: skipped: an incremental run" in out
    assert lines(failed)[REPOSITORY].cursor == IDS[249]  # set, with the page it wrote
    assert Repository.objects.count() == 250  # that page stays: rows are never lost

    out = sync("--incremental")

    # From the completed run's cursor, not the failed run's: the failed run's page is read again.
    assert f"  resuming after repository id {IDS[149]}, from run {start.pk}\n" in out
    assert "  page 1: 100 flushed (0 created, 100 updated), 100 so far\n" in out
    assert "  page 2: 50 flushed (50 created, 0 updated), 150 so far\n" in out
    assert lines(latest())[REPOSITORY].cursor == IDS[-1]
    assert Repository.objects.count() == REPOSITORIES


def test_an_incremental_dry_run_skips_the_cleanups_too() -> None:
    sync("--drop", "20")
    out = sync("--incremental", "--dry-run")
    assert "Cleanup of repositories (dry run): skipped: incremental_run: " in out
    assert "Cleanup of owners: skipped: an incremental run" in out
    assert lines(latest())[REPOSITORY].cleanup_status == CleanupStatus.NOT_RUN


def test_the_listing_is_in_id_order_whatever_the_files(tmp_path: Path) -> None:
    path = write_source(tmp_path, SAMPLE["repositories"][::-1])
    source = SampleSource(Path(path), drop=20)
    assert [record["id"] for page in source.repositories() for record in page] == IDS[:-20]
    assert source.dropped_ids() == IDS[-20:]
    assert [record["id"] for page in source.repositories(IDS[-30]) for record in page] == (
        IDS[-29:-20]
    )

    sync("--source", path, "--drop", "20")
    assert lines(latest())[REPOSITORY].cursor == IDS[-21]
    out = sync("--source", path, "--incremental")
    assert "  page 1: 20 flushed (20 created, 0 updated), 20 so far\n" in out


def test_a_cursor_that_is_not_a_repository_id_fails_the_flush() -> None:
    """Another job of the scope left a cursor of its own: said, nothing read or written."""
    with services.track_run(SCOPE) as run, services.flush(run.pk, Repository) as flush:
        flush.write([], cursor="page-token")

    error, out = sync_failing("--incremental")

    assert (
        f"  page 1: FLUSH FAILED: Flush of run '{latest().pk}' failed: ValueError: the cursor of "
        f"run {run.pk} is 'page-token', not a repository id\n"
    ) in out
    assert error.returncode == 1
    assert not Repository.objects.exists()


def test_the_admin_lists_the_synced_rows(admin_client: Any) -> None:
    sync()
    repository = Repository.objects.select_related("owner").first()
    assert repository is not None
    for name in ("repository", "owner"):
        response = admin_client.get(f"/admin/example_project/{name}/")
        assert response.status_code == 200
        assert repository.owner.login in response.content.decode()
