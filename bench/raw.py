"""The raw psycopg 3 baselines: the SQL a skilled engineer would write for the same semantics.

Each baseline works on the tables runs_app writes (its own; for ``flush_repos``, the tracked
model of bench/tracked/), with the same transaction boundaries as the operation it is compared
with, but without the app's validation, ledger and audit layers (except
where the semantics need them: the cleanup's audit rows, the drain's lease fencing). That
overhead is what the ratios measure.

Also here: the untimed seeding helpers, which write rows server-side (``generate_series``) so a
round's setup costs little and is identical for both sides.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from typing import Any, Protocol

import psycopg
from psycopg import sql

Connection = psycopg.Connection[tuple[Any, ...]]

PROJECT = "runs_app_project"
RUN = "runs_app_run"
STATE = "runs_app_runstate"
OUTBOX = "runs_app_runoutbox"
EVENT = "runs_app_runevent"
TABLES = (PROJECT, RUN, STATE, OUTBOX, EVENT)


class Publisher(Protocol):
    def publish(self, messages: Sequence[Any]) -> None: ...


def connect(url: str) -> Connection:
    """An autocommit connection: every transaction below is an explicit ``conn.transaction()``."""
    return psycopg.connect(url, autocommit=True)


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def encode_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# --- Flush: COPY into a temporary table + INSERT ... ON CONFLICT, one transaction per batch ----

STAGE_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS bench_stage"
    " (key text NOT NULL, name text NOT NULL, data jsonb NOT NULL) ON COMMIT DELETE ROWS"
)
# Sorted by key so concurrent flushes lock rows in one order; xmax = 0 tells an insert from an
# update, so the created/updated counts come from the database, as runs_app's ledger does.
UPSERT = f"""
WITH upserted AS (
    INSERT INTO {PROJECT} AS p
        (scope, key, name, data, last_seen_run_id, created_at, updated_at)
    SELECT %(scope)s, s.key, s.name, s.data, %(run_id)s, now(), now()
    FROM bench_stage s ORDER BY s.key
    ON CONFLICT (scope, key) DO UPDATE SET
        name = EXCLUDED.name,
        data = EXCLUDED.data,
        last_seen_run_id = EXCLUDED.last_seen_run_id,
        updated_at = EXCLUDED.updated_at
    RETURNING (xmax = 0) AS created
)
SELECT count(*) FILTER (WHERE created), count(*) FROM upserted
"""


def flush(
    conn: Connection,
    run_id: str,
    scope: str,
    projects: Iterable[Mapping[str, Any]],
    batch_size: int,
) -> tuple[int, int]:
    """Upsert ``projects`` stamped with ``run_id``; returns (created, updated).

    One transaction per ``batch_size`` rows: COPY the batch into a temporary table (emptied at
    commit), then one set-based upsert from it. Memory is bounded by one batch.
    """
    created = updated = 0
    with conn.cursor() as cursor:
        cursor.execute(STAGE_DDL)
        for batch in batched(projects, batch_size):
            with conn.transaction():
                with cursor.copy("COPY bench_stage (key, name, data) FROM STDIN") as copy:
                    for project in batch:
                        copy.write_row(
                            (project["key"], project["name"], encode_json(project["data"]))
                        )
                cursor.execute(UPSERT, {"scope": scope, "run_id": run_id})
                row = cursor.fetchone()
                assert row is not None
                created += row[0]
                updated += row[1] - row[0]
    return created, updated


# --- Flush a user's tracked model: the same, on bench.tracked's typed table -----------------

REPO = "bench_repo"
OWNER = "bench_owner"
# The columns a row sets, in COPY order (the source's; the stamps are the upsert's).
REPO_COLUMNS = (
    "github_id",
    "name",
    "url",
    "stars",
    "archived",
    "owner_id",
    "pushed_at",
    "node_id",
)
REPO_STAGE_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS bench_repo_stage (github_id bigint NOT NULL,"
    " name text NOT NULL, url text NOT NULL, stars integer NOT NULL, archived boolean NOT NULL,"
    " owner_id bigint NOT NULL, pushed_at timestamptz, node_id uuid NOT NULL)"
    " ON COMMIT DELETE ROWS"
)
_REPO_SET = ", ".join(
    f"{column} = EXCLUDED.{column}"
    for column in (*REPO_COLUMNS[1:], "last_seen_run_id", "updated_at")
)
# As for projects: sorted by key, stamped with the run, created_at and last_confirmed_run left
# alone on conflict, inserts told from updates by xmax = 0.
REPO_UPSERT = f"""
WITH upserted AS (
    INSERT INTO {REPO} AS t
        ({", ".join(REPO_COLUMNS)}, last_seen_run_id, created_at, updated_at)
    SELECT {", ".join("s." + column for column in REPO_COLUMNS)}, %(run_id)s, now(), now()
    FROM bench_repo_stage s ORDER BY s.github_id
    ON CONFLICT (github_id) DO UPDATE SET {_REPO_SET}
    RETURNING (xmax = 0) AS created
)
SELECT count(*) FILTER (WHERE created), count(*) FROM upserted
"""


def flush_repos(
    conn: Connection, run_id: str, repos: Iterable[Mapping[str, Any]], batch_size: int
) -> tuple[int, int]:
    """Upsert ``repos`` (mappings with ``REPO_COLUMNS``) into bench.tracked's table stamped with
    ``run_id``; returns (created, updated). One transaction per ``batch_size`` rows: a binary
    COPY of the batch into a temporary table, then one set-based upsert from it."""
    created = updated = 0
    copy_sql = f"COPY bench_repo_stage ({', '.join(REPO_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
    types = ("int8", "text", "text", "int4", "bool", "int8", "timestamptz", "uuid")
    with conn.cursor() as cursor:
        cursor.execute(REPO_STAGE_DDL)
        for batch in batched(repos, batch_size):
            with conn.transaction():
                with cursor.copy(copy_sql) as copy:
                    copy.set_types(types)
                    for repo in batch:
                        copy.write_row(
                            (
                                repo["github_id"],
                                repo["name"],
                                repo["url"],
                                repo["stars"],
                                repo["archived"],
                                repo["owner_id"],
                                repo["pushed_at"],
                                repo["node_id"],
                            )
                        )
                cursor.execute(REPO_UPSERT, {"run_id": run_id})
                row = cursor.fetchone()
                assert row is not None
                created += row[0]
                updated += row[1] - row[0]
    return created, updated


# --- Confirm: one set-based UPDATE in the transaction that closes the run ----------------------


def confirm(conn: Connection, run_id: str, scope: str) -> int:
    """Complete the run and stamp ``last_confirmed_run`` on every project it saw; returns the
    number confirmed. One transaction: the state row is locked by its UPDATE first."""
    with conn.transaction(), conn.cursor() as cursor:
        cursor.execute(
            f"UPDATE {STATE} SET status = 'completed', finished_at = now(), heartbeat_at = now()"
            " WHERE run_id = %s AND status = 'active' RETURNING flush_status",
            (run_id,),
        )
        if cursor.fetchone() is None:
            raise RuntimeError(f"run {run_id} is not active")
        cursor.execute(f"UPDATE {RUN} SET closed = true WHERE id = %s", (run_id,))
        cursor.execute(
            f"UPDATE {PROJECT} SET last_confirmed_run_id = %s"
            " WHERE scope = %s AND last_seen_run_id = %s",
            (run_id, scope, run_id),
        )
        confirmed = cursor.rowcount
        cursor.execute(
            f"UPDATE {STATE} SET rows_confirmed = %s WHERE run_id = %s", (confirmed, run_id)
        )
    return confirmed


# --- Cleanup: batched DELETE ... RETURNING, the removed rows kept as an audit event ------------

CLEANUP_DELETE = f"""
DELETE FROM {PROJECT} WHERE id IN (
    SELECT id FROM {PROJECT}
    WHERE scope = %(scope)s
      AND last_seen_run_id IN (
          SELECT id FROM {RUN} WHERE scope = %(scope)s AND ordinal < %(ordinal)s
      )
    LIMIT %(batch)s
    FOR UPDATE
)
RETURNING key, name, data
"""


def cleanup(conn: Connection, run_id: str, scope: str, batch_size: int) -> int:
    """Delete the scope's projects last seen by a run older than ``run_id``; returns how many.

    The predicate is an allow-list of older runs inside the DELETE (a row re-stamped by a newer
    run meanwhile is never deleted). Each batch is one transaction that deletes, returns the
    removed rows and appends them as one ``projects.removed`` event (the audit), so a row never
    disappears without its audit.
    """
    with conn.cursor() as cursor:
        cursor.execute(f"SELECT ordinal FROM {RUN} WHERE id = %s", (run_id,))
        row = cursor.fetchone()
        assert row is not None
        ordinal = row[0]
        removed = 0
        while True:
            with conn.transaction():
                cursor.execute(
                    CLEANUP_DELETE, {"scope": scope, "ordinal": ordinal, "batch": batch_size}
                )
                rows = cursor.fetchall()
                if not rows:
                    break
                payload = {
                    "count": len(rows),
                    "projects": [{"key": k, "name": n, "data": d} for k, n, d in rows],
                }
                seq = reserve_seqs(cursor, run_id, 1, only_active=False)
                cursor.execute(
                    f"INSERT INTO {EVENT} (run_id, seq, type, payload, created_at)"
                    " VALUES (%s, %s, 'projects.removed', %s, now())",
                    (run_id, seq, encode_json(payload)),
                )
                removed += len(rows)
        cursor.execute(
            f"UPDATE {STATE} SET cleanup_status = 'done', rows_removed = %s, cleanup_at = now()"
            " WHERE run_id = %s",
            (removed, run_id),
        )
    return removed


# --- Soft cleanup: batched UPDATE ... SET deleted_at ... RETURNING, audited as for deletes ------

SOFT_REPO = "bench_soft_repo"
# The same allow-list of older runs as CLEANUP_DELETE, and never a row already tombstoned.
SOFT_CLEANUP_UPDATE = f"""
UPDATE {SOFT_REPO} AS t
SET deleted_at = now(), deleted_by_run_id = %(run_id)s, deleted_reason = 'not_seen'
WHERE t.id IN (
    SELECT id FROM {SOFT_REPO}
    WHERE deleted_at IS NULL
      AND last_seen_run_id IN (
          SELECT id FROM {RUN} WHERE scope = %(scope)s AND ordinal < %(ordinal)s
      )
    LIMIT %(batch)s
    FOR UPDATE
)
RETURNING row_to_json(t)::text
"""


def cleanup_soft(
    conn: Connection, run_id: str, scope: str, batch_size: int, *, event_type: str, model: str
) -> int:
    """Tombstone the soft-deleting repos last seen by a run of ``scope`` older than ``run_id``
    (the whole table is one scope); returns how many.

    As ``cleanup``, one transaction per batch: the UPDATE (re-stating the allow-list of older
    runs and ``deleted_at IS NULL``) returns every column of each row as JSON, and the batch's
    rows are appended as one ``event_type`` event (``{"scope", "model", "mode", "rows"}``, the
    row texts joined as they came back, never decoded), then the ledger says done."""
    head = f'{{"scope":{encode_json(scope)},"model":{encode_json(model)},"mode":"soft","rows":['
    with conn.cursor() as cursor:
        cursor.execute(f"SELECT ordinal FROM {RUN} WHERE id = %s", (run_id,))
        row = cursor.fetchone()
        assert row is not None
        ordinal = row[0]
        removed = 0
        while True:
            with conn.transaction():
                cursor.execute(
                    SOFT_CLEANUP_UPDATE,
                    {"scope": scope, "ordinal": ordinal, "batch": batch_size, "run_id": run_id},
                )
                records = [record for (record,) in cursor.fetchall()]
                if not records:
                    break
                seq = reserve_seqs(cursor, run_id, 1, only_active=False)
                cursor.execute(
                    f"INSERT INTO {EVENT} (run_id, seq, type, payload, created_at)"
                    " VALUES (%s, %s, %s, %s, now())",
                    (run_id, seq, event_type, head + ",".join(records) + "]}"),
                )
                removed += len(records)
        cursor.execute(
            f"UPDATE {STATE} SET cleanup_status = 'done', rows_removed = %s, cleanup_at = now()"
            " WHERE run_id = %s",
            (removed, run_id),
        )
    return removed


# --- Restore: INSERT ... SELECT from each audit event's JSON, one transaction -----------------


def restore_repos(conn: Connection, run_id: str, event_type: str) -> int:
    """Insert back the repos the run's cleanup deleted, from its ``event_type`` audit events
    (``{"rows": [every column of each row]}``): one ``INSERT ... SELECT`` from
    ``jsonb_populate_recordset`` per event, ``ON CONFLICT DO NOTHING``, all in one transaction
    that also records the restore on the ledger. Returns how many rows came back."""
    restored = 0
    with conn.transaction(), conn.cursor() as cursor:
        cursor.execute(
            f"SELECT id FROM {EVENT} WHERE run_id = %s AND type = %s ORDER BY seq",
            (run_id, event_type),
        )
        for (event_id,) in cursor.fetchall():
            cursor.execute(
                f"INSERT INTO {REPO} SELECT r.* FROM {EVENT} e"
                f" CROSS JOIN LATERAL jsonb_populate_recordset(NULL::{REPO}, e.payload -> 'rows') r"
                " WHERE e.id = %s ON CONFLICT DO NOTHING",
                (event_id,),
            )
            restored += cursor.rowcount
        cursor.execute(
            f"UPDATE {STATE} SET cleanup_status = 'restored', cleanup_at = now() WHERE run_id = %s",
            (run_id,),
        )
    return restored


# --- Append: a row-locked counter on the run, then the events ----------------------------------


def reserve_seqs(cursor: psycopg.Cursor[Any], run_id: str, count: int, *, only_active: bool) -> int:
    """Bump the run's counter by ``count`` and return the new last seq. The UPDATE locks the run
    row until commit, so concurrent appenders get contiguous seqs that commit in order."""
    # Open runs only: the flag on the row this UPDATE locks (runs_app's semantics: an append
    # that waited for a closing transaction re-checks it on the committed row version).
    active = " AND NOT r.closed" if only_active else ""
    cursor.execute(
        f"UPDATE {RUN} r SET last_seq = last_seq + %s WHERE id = %s{active} RETURNING last_seq",
        (count, run_id),
    )
    row = cursor.fetchone()
    if row is None:
        raise RuntimeError(f"run {run_id} is not active")
    return int(row[0])


def append_one(
    conn: Connection, run_id: str, event_type: str, payload: Any, *, notify: str = ""
) -> int:
    """Append one event in its own transaction; returns its seq. ``notify``: a channel to wake a
    listening relay on (delivered at commit)."""
    with conn.transaction(), conn.cursor() as cursor:
        seq = reserve_seqs(cursor, run_id, 1, only_active=True)
        cursor.execute(
            f"INSERT INTO {EVENT} (run_id, seq, type, payload, created_at)"
            " VALUES (%s, %s, %s, %s, now())",
            (run_id, seq, event_type, encode_json(payload)),
        )
        if notify:
            cursor.execute("SELECT pg_notify(%s, %s)", (notify, run_id))
    return seq


def append_many(conn: Connection, run_id: str, events: Sequence[Mapping[str, Any]]) -> int:
    """Append events (``{"type": ..., "payload": ...}``) in one transaction: one counter bump,
    one INSERT from arrays. Returns the last seq."""
    with conn.transaction(), conn.cursor() as cursor:
        last = reserve_seqs(cursor, run_id, len(events), only_active=True)
        first = last - len(events) + 1
        cursor.execute(
            f"INSERT INTO {EVENT} (run_id, seq, type, payload, created_at)"
            " SELECT %s, u.seq, u.type, u.payload::jsonb, now()"
            " FROM unnest(%s::bigint[], %s::text[], %s::text[]) AS u(seq, type, payload)",
            (
                run_id,
                list(range(first, last + 1)),
                [event["type"] for event in events],
                [encode_json(event["payload"]) for event in events],
            ),
        )
    return last


# --- Drain: SKIP LOCKED claim with a lease, publish outside, lease-fenced ack ------------------


@dataclass(frozen=True, slots=True)
class RawMessage:
    """What the raw relay hands its publisher: the same fields as runs_app's Message."""

    id: str
    run_id: str
    scope: str
    seq: int
    type: str
    payload: Any
    occurred_at: datetime


# Claim: lock only outbox rows (appenders lock run rows and must never wait for a relay), skip
# the ones another relay holds, take runs with pending events whose lease is free or expired.
CLAIM = f"""
WITH claimable AS (
    SELECT o.run_id FROM {OUTBOX} o
    WHERE o.blocked_at IS NULL
      AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= now())
      AND (o.lease_until IS NULL OR o.lease_until < now())
      AND EXISTS (
          SELECT 1 FROM {EVENT} e
          WHERE e.run_id = o.run_id AND e.seq >= o.next_seq
            AND e.published_at IS NULL AND e.skipped_at IS NULL
      )
    LIMIT %(runs)s
    FOR UPDATE OF o SKIP LOCKED
)
UPDATE {OUTBOX} o
SET lease_token = %(token)s, lease_until = now() + make_interval(secs => %(lease)s),
    leased_by = %(me)s
FROM claimable c WHERE o.run_id = c.run_id
RETURNING o.run_id, o.next_seq
"""
# The pending events of the claimed runs, in seq order, at most ``events`` per run.
READ = f"""
SELECT c.run_id, r.scope, e.seq, e.type, e.payload, e.created_at
FROM unnest(%(run_ids)s::text[], %(next_seqs)s::bigint[]) AS c(run_id, next_seq)
JOIN {RUN} r ON r.id = c.run_id
CROSS JOIN LATERAL (
    SELECT seq, type, payload, created_at FROM {EVENT} e
    WHERE e.run_id = c.run_id AND e.seq >= c.next_seq
    ORDER BY e.seq LIMIT %(events)s
) e
ORDER BY c.run_id, e.seq
"""
# Ack: advance the cursor and release the lease only where our token still holds (a relay whose
# lease expired and was taken over changes nothing), then mark exactly those events published.
ACK = f"""
WITH acked AS (
    UPDATE {OUTBOX} o
    SET next_seq = a.last_seq + 1, lease_token = NULL, lease_until = NULL, leased_by = '',
        attempts = 0, last_error = '', next_attempt_at = NULL
    FROM unnest(%(run_ids)s::text[], %(first_seqs)s::bigint[], %(last_seqs)s::bigint[])
         AS a(run_id, first_seq, last_seq)
    WHERE o.run_id = a.run_id AND o.lease_token = %(token)s
    RETURNING o.run_id, a.first_seq, a.last_seq
)
UPDATE {EVENT} e SET published_at = now()
FROM acked
WHERE e.run_id = acked.run_id AND e.seq BETWEEN acked.first_seq AND acked.last_seq
"""


def drain_pass(
    conn: Connection,
    publisher: Publisher,
    *,
    runs: int,
    events: int,
    lease_seconds: float = 60.0,
    me: str = "",
) -> int:
    """One relay pass: claim up to ``runs`` runs, publish up to ``events`` of each, per run, in
    seq order, outside any transaction, then ack. Returns the number of events published."""
    token = uuid.uuid4()
    me = me or f"raw-{os.getpid()}"
    with conn.cursor() as cursor:
        with conn.transaction():
            cursor.execute(CLAIM, {"runs": runs, "token": token, "lease": lease_seconds, "me": me})
            claimed = cursor.fetchall()
        if not claimed:
            return 0
        cursor.execute(
            READ,
            {
                "run_ids": [run_id for run_id, _ in claimed],
                "next_seqs": [next_seq for _, next_seq in claimed],
                "events": events,
            },
        )
        by_run: dict[str, list[RawMessage]] = {run_id: [] for run_id, _ in claimed}
        for run_id, scope, seq, event_type, payload, created_at in cursor:
            by_run[run_id].append(
                RawMessage(f"{run_id}:{seq}", run_id, scope, seq, event_type, payload, created_at)
            )
        # Publish outside any transaction; the lease keeps other relays off these runs.
        published = 0
        first_seqs, last_seqs = [], []
        for run_id, next_seq in claimed:
            messages = by_run[run_id]
            if messages:
                publisher.publish(messages)
                published += len(messages)
            first_seqs.append(next_seq)
            last_seqs.append(messages[-1].seq if messages else next_seq - 1)
        with conn.transaction():
            cursor.execute(
                ACK,
                {
                    "run_ids": [run_id for run_id, _ in claimed],
                    "first_seqs": first_seqs,
                    "last_seqs": last_seqs,
                    "token": token,
                },
            )
    return published


def drain(conn: Connection, publisher: Publisher, *, runs: int, events: int) -> int:
    """Passes until nothing is claimable; returns the number of events published."""
    total = 0
    while published := drain_pass(conn, publisher, runs=runs, events=events):
        total += published
    return total


def listen_and_drain(
    url: str, channel: str, publisher: Publisher, *, runs: int, events: int, stop: Any
) -> None:
    """A raw looping relay: drain, then sleep on LISTEN (woken by NOTIFY or after a second)
    until ``stop`` (a multiprocessing Event) is set. Listens on its own connection."""
    with connect(url) as listener, connect(url) as conn:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        while not stop.is_set():
            drain(conn, publisher, runs=runs, events=events)
            for _ in listener.notifies(timeout=1.0, stop_after=1):
                pass


# --- Untimed seeding, identical for both sides ------------------------------------------------


def reset(conn: Connection, *extra: str) -> None:
    """Empty runs_app's tables and the ``extra`` ones (bench.tracked's, when they exist)."""
    conn.execute(f"TRUNCATE {', '.join((*TABLES, *extra))} RESTART IDENTITY CASCADE")


def settle(conn: Connection, *extra: str) -> None:
    """Fresh statistics and a checkpoint before a timed step, so neither side pays for the
    other's dirty pages or is planned against the statistics of an empty table."""
    conn.execute(f"ANALYZE {', '.join((*TABLES, *extra))}")
    conn.execute("CHECKPOINT")


def project_key(index: int) -> str:
    return f"k{index:09d}"


def seed_projects(
    conn: Connection, scope: str, run_id: str, start: int, stop: int, *, every: int = 0
) -> int:
    """Projects ``start .. stop-1`` of ``scope`` last seen by ``run_id`` (keys as
    ``project_key``), skipping indexes divisible by ``every`` if given. Returns how many."""
    with conn.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {PROJECT}
                (scope, key, name, data, last_seen_run_id, created_at, updated_at)
            SELECT %(scope)s, 'k' || lpad(g::text, 9, '0'), 'Project ' || g,
                   jsonb_build_object('n', g, 'v', 0), %(run_id)s, now(), now()
            FROM generate_series(%(start)s, %(stop)s - 1) AS g
            WHERE %(every)s = 0 OR g %% %(every)s <> 0
            """,
            {"scope": scope, "run_id": run_id, "start": start, "stop": stop, "every": every},
        )
        return cursor.rowcount


#: bench.tracked's keys are ``REPO_KEY_BASE + index``: beyond 32 bits, as a bigint key may be.
REPO_KEY_BASE = 10_000_000_000


def seed_owners(conn: Connection, owners: int) -> int:
    """Owners ``1 .. owners`` (the rows ``BenchRepo.owner`` points to). Returns how many."""
    with conn.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {OWNER} (id, login) SELECT g, 'owner-' || g"
            " FROM generate_series(1, %s) AS g",
            (owners,),
        )
        return cursor.rowcount


def seed_repos(
    conn: Connection,
    run_id: str,
    count: int,
    owners: int,
    *,
    start: int = 0,
    table: str = REPO,
) -> int:
    """Repos ``start .. start+count-1`` (keys ``REPO_KEY_BASE + index``) of ``table`` (REPO or
    SOFT_REPO) last seen by ``run_id``, values other than the benchmark's source has (so an
    update pass changes every row). Returns how many."""
    with conn.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {table} ({", ".join(REPO_COLUMNS)}, last_seen_run_id, created_at,
                updated_at)
            SELECT %(base)s + g, 'old-' || g, 'https://example.com/old/' || g, 0, false,
                   g %% %(owners)s + 1, NULL, gen_random_uuid(), %(run_id)s, now(), now()
            FROM generate_series(%(start)s, %(start)s + %(count)s - 1) AS g
            """,
            {
                "base": REPO_KEY_BASE,
                "owners": owners,
                "run_id": run_id,
                "count": count,
                "start": start,
            },
        )
        return cursor.rowcount


def seed_outbox(
    conn: Connection,
    runs: int,
    events_per_run: int,
    *,
    prefix: str = "drain",
    finished: bool = False,
    with_events: bool = True,
) -> int:
    """``runs`` active runs (one scope each) with ``events_per_run`` pending events each, as
    runs_app writes them (run, state, outbox at seq 1). Returns the number of events.

    ``finished``: completed runs whose outbox is past all of their ``events_per_run`` events
    (cursor at ``events_per_run + 1``); their events, if ``with_events``, are published."""
    params = {
        "runs": runs,
        "per": events_per_run,
        "prefix": f"{prefix}-",
        "status": "completed" if finished else "active",
        "next_seq": events_per_run + 1 if finished else 1,
    }
    with conn.transaction(), conn.cursor() as cursor:
        # Ordinals from runs_app's sequence, as create_run draws them (they must not collide).
        cursor.execute(
            f"""
            INSERT INTO {RUN} (id, scope, metadata, trace_context, last_seq, ordinal, closed,
                created_at)
            SELECT %(prefix)s || g, %(prefix)s || g, '{{}}', '{{}}', %(per)s,
                   nextval('runs_app_run_ordinal_seq'), %(closed)s, now()
            FROM generate_series(1, %(runs)s) AS g
            """,
            {**params, "closed": finished},
        )
        cursor.execute(
            f"""
            INSERT INTO {STATE} (run_id, scope, status, error, started_at, heartbeat_at,
                flush_status, flush_error, rows_seen, rows_created, rows_updated, rows_confirmed,
                cleanup_status, cleanup_reason, cleanup_message, rows_removed, cleanup_forced)
            SELECT %(prefix)s || g, %(prefix)s || g, %(status)s, '', now(), now(),
                'not_started', '', 0, 0, 0, 0, 'not_run', '', '', 0, false
            FROM generate_series(1, %(runs)s) AS g
            """,
            params,
        )
        cursor.execute(
            f"""
            INSERT INTO {OUTBOX} (run_id, next_seq, attempts, last_error, leased_by)
            SELECT %(prefix)s || g, %(next_seq)s, 0, '', ''
            FROM generate_series(1, %(runs)s) AS g
            """,
            params,
        )
        if finished:
            cursor.execute(
                f"UPDATE {STATE} SET finished_at = now() WHERE run_id LIKE %(prefix)s || '%%'",
                params,
            )
        if not with_events:
            return 0
        cursor.execute(
            f"""
            INSERT INTO {EVENT} (run_id, seq, type, payload, created_at, published_at)
            SELECT %(prefix)s || g, s, 'bench.event', jsonb_build_object('n', s), now(),
                   CASE WHEN %(status)s = 'completed' THEN now() END
            FROM generate_series(1, %(runs)s) AS g, generate_series(1, %(per)s) AS s
            """,
            params,
        )
        return cursor.rowcount


def seed_history(conn: Connection, runs: int, events_per_run: int, *, with_events: bool) -> int:
    """``runs`` finished runs (``hist-<n>``) whose outbox is past ``events_per_run`` events;
    the events themselves (published) only ``with_events`` (see ``seed_history_events``)."""
    seed_outbox(conn, runs, events_per_run, prefix="hist", finished=True, with_events=False)
    return seed_history_events(conn, runs, events_per_run) if with_events else 0


def seed_history_events(conn: Connection, runs: int, events_per_run: int) -> int:
    """The published events of ``seed_history``'s runs, set-based (``generate_series``), a
    transaction per 1,000,000 events or so, then VACUUM ANALYZE as autovacuum would leave the
    table. Returns the number of events."""
    chunk = max(1, 1_000_000 // events_per_run)
    seeded = 0
    with conn.cursor() as cursor:
        for start in range(1, runs + 1, chunk):
            cursor.execute(
                f"""
                INSERT INTO {EVENT} (run_id, seq, type, payload, created_at, published_at)
                SELECT 'hist-' || g, s, 'bench.event', jsonb_build_object('n', s), now(), now()
                FROM generate_series(%(start)s::int, %(stop)s::int) AS g,
                     generate_series(1, %(per)s::int) AS s
                """,
                {"start": start, "stop": min(runs, start + chunk - 1), "per": events_per_run},
            )
            seeded += cursor.rowcount
    conn.execute(f"VACUUM (ANALYZE) {EVENT}")
    return seeded


def delete_runs(conn: Connection, prefix: str) -> int:
    """Delete the runs whose id starts with ``prefix``, with their events, outbox and state
    (one transaction, by id so the event table's index is used). Returns how many runs."""
    with conn.transaction(), conn.cursor() as cursor:
        cursor.execute(f"SELECT id FROM {RUN} WHERE starts_with(id, %s)", (prefix,))
        ids = [row[0] for row in cursor.fetchall()]
        if ids:
            for table in (EVENT, OUTBOX, STATE):
                cursor.execute(f"DELETE FROM {table} WHERE run_id = ANY(%s)", (ids,))
            cursor.execute(f"DELETE FROM {RUN} WHERE id = ANY(%s)", (ids,))
    return len(ids)


def count(conn: Connection, sql: str, params: Sequence[Any] = ()) -> int:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return int(row[0])
