#!/usr/bin/env python
"""Benchmark runs_app against raw psycopg 3 baselines measured in the same run.

    DATABASE_URL=postgres://root@127.0.0.1:5432/postgres python bench/run.py
    python bench/run.py --only flush_insert,append_1 --rows 50000 --json bench.json
    python bench/run.py --only flush_model_insert,flush_model_update   # a user's tracked model
    python bench/run.py --only cleanup_soft,restore   # reversible cleanup (issue 12)
    python bench/run.py --smoke          # CI: tiny sizes, checks the harness end to end
    python bench/run.py --peers          # also procrastinate, django-celery-outbox, ...

The server comes from DATABASE_URL (PostgreSQL; default postgres://127.0.0.1:5432/postgres); the
benchmark (re)creates its own database on it (``--database-name``, default ``bench_runs_app``,
always ``bench_*``), migrates it and never touches another database; with ``--peers``, also one
``bench_peer_<peer>`` database per peer. The ``flush_model_*`` benchmarks flush a user's tracked
model of eight typed columns (``bench.tracked``, installed by bench/django_settings.py only; its
tables are created by the benchmark, without a migration); ``restore`` puts back the rows a
cleanup of that model deleted, and ``cleanup_soft`` tombstones rows of its soft-deleting twin.

For each operation, raw psycopg and runs_app run alternately (the order flips every round) on the
same freshly seeded tables; the table shows the median rate of each side, the ratio runs_app / raw
(higher is better; for latency and memory raw / runs_app) and the target from issues 7, 11, 12 and
14. With ``--peers`` (opt-in, never in CI: it installs each peer from PyPI into its own virtualenv
under bench/.peers/ and runs bench/peers/<peer>_driver.py there), the outbox rows also show the
best peer's median and runs_app / that peer, against issue 14's peer targets; a peer that cannot be
installed or run shows "n/a" with the reason. Exit status: 0 when every target is met (``--smoke``:
whenever the harness ran end to end), 1 when a target is missed or a step raised (its row shows
"n/a"; the other steps still run), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import random
import re
import resource
import select
import signal
import statistics
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Run as a script, Python puts bench/ first on sys.path: replace it by the project root so
# ``bench.*``, ``runs_app`` and ``example_project`` import as packages.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if p and Path(p).resolve() != HERE]

DEFAULT_URL = "postgres://127.0.0.1:5432/postgres"
SCOPE = "bench"
# flush_model_*: issue 11 compares at one transaction per 1,000 rows on both sides, and the
# repos point to this many owners.
MODEL_BATCH = 1_000
MODEL_OWNERS = 1_000

BENCHMARKS = (
    "flush_insert",
    "flush_update",
    "flush_model_insert",
    "flush_model_update",
    "confirm",
    "cleanup",
    "cleanup_soft",
    "restore",
    "append_1",
    "append_100",
    "drain",
    "drain_per_run",
    "drain_backlog",
    "drain_unpruned",
    "latency",
    "memory",
    "drain_memory",
)


# --- Sizes and command line ------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    rows: int  # flush and flush_model (insert and update passes), confirm; cleanup's scope size
    events: int  # drain over `runs` runs; append_100; append_1 uses a tenth
    runs: int  # drain: events spread over this many runs
    memory_rows: int
    latency_samples: int
    rounds: int
    backlog_runs: tuple[int, ...]  # drain_backlog: 1 event per run, one drain at each size
    cleanup_removed: tuple[int, ...]  # cleanup: rows removed, from a scope 10x as large
    unpruned_events: int  # drain_unpruned: published events left in the table
    # drain_memory: runs x events per run, each event's payload about MAX_PAYLOAD_BYTES
    drain_memory: tuple[int, int] = (100, 100)

    @property
    def unpruned_runs(self) -> int:
        """The finished runs the unpruned events belong to (100 each)."""
        return max(1, self.unpruned_events // 100)

    @property
    def append_one_events(self) -> int:
        return max(1, self.events // 10)

    @property
    def per_run_runs(self) -> int:
        return max(1, self.events // 5)

    @property
    def events_per_run(self) -> int:
        return max(1, self.events // self.runs)


FULL = Sizes(
    rows=200_000,
    events=100_000,
    runs=1_000,
    memory_rows=1_000_000,
    latency_samples=200,
    rounds=3,
    backlog_runs=(1_000, 10_000, 100_000),
    cleanup_removed=(2_000, 20_000, 200_000),
    unpruned_events=10_000_000,
)
SMOKE = Sizes(
    rows=2_000,
    events=2_000,
    runs=20,
    memory_rows=5_000,
    drain_memory=(5, 5),
    latency_samples=5,
    rounds=1,
    backlog_runs=(200, 400),
    cleanup_removed=(200,),
    unpruned_events=20_000,
)


def positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def int_list(text: str) -> tuple[int, ...]:
    values = tuple(positive_int(item) for item in text.split(",") if item.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N[,N...]")
    return values


def benchmark_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown benchmark {', '.join(unknown) or text!r}; choose from {', '.join(BENCHMARKS)}"
        )
    return names


def database_name(text: str) -> str:
    # The benchmark drops and recreates this database: only ever one of its own.
    if not re.fullmatch(r"bench_[a-z0-9_]{1,50}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: the name must match bench_[a-z0-9_]+")
    return text


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="runs_app vs raw psycopg, measured in the same run (see the module docstring).",
    )
    parser.add_argument(
        "--rows", type=positive_int, help=f"projects, tracked model rows (default {FULL.rows:,})"
    )
    parser.add_argument("--events", type=positive_int, help=f"events (default {FULL.events:,})")
    parser.add_argument(
        "--runs", type=positive_int, help=f"runs the drain spreads events over ({FULL.runs:,})"
    )
    parser.add_argument(
        "--memory-rows", type=positive_int, help=f"memory benchmark ({FULL.memory_rows:,})"
    )
    parser.add_argument(
        "--latency-samples", type=positive_int, help=f"latency ({FULL.latency_samples})"
    )
    parser.add_argument("--rounds", type=positive_int, help=f"rounds per side ({FULL.rounds})")
    parser.add_argument(
        "--backlog-runs",
        type=int_list,
        metavar="N[,N]",
        help=f"drain_backlog sizes ({','.join(str(n) for n in FULL.backlog_runs)})",
    )
    parser.add_argument(
        "--cleanup-removed",
        type=int_list,
        metavar="N[,N]",
        help="cleanup: rows removed, each from a scope 10x as large "
        f"({','.join(str(n) for n in FULL.cleanup_removed)})",
    )
    parser.add_argument(
        "--unpruned-events",
        type=positive_int,
        help=f"drain_unpruned: published events left in the table ({FULL.unpruned_events:,})",
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also measure the peers (procrastinate, django-celery-outbox, django-outbox-pattern),"
        " each installed from PyPI in its own virtualenv under bench/.peers/",
    )
    parser.add_argument(
        "--only",
        type=benchmark_names,
        action="extend",
        metavar="NAME[,NAME]",
        help=f"run only these: {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, one round; exit 0 whatever the ratios (CI)",
    )
    parser.add_argument(
        "--database-name",
        type=database_name,
        help="the database to (re)create (default bench_runs_app, bench_runs_app_smoke)",
    )
    # Internal: the memory benchmark measures each side in a fresh process.
    parser.add_argument("--memory-child", choices=("raw", "app"), help=argparse.SUPPRESS)
    parser.add_argument("--drain-memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def sizes_from(args: argparse.Namespace) -> Sizes:
    base = SMOKE if args.smoke else FULL
    return Sizes(
        rows=args.rows or base.rows,
        events=args.events or base.events,
        runs=args.runs or base.runs,
        memory_rows=args.memory_rows or base.memory_rows,
        drain_memory=base.drain_memory,
        latency_samples=args.latency_samples or base.latency_samples,
        rounds=args.rounds or base.rounds,
        backlog_runs=args.backlog_runs or base.backlog_runs,
        cleanup_removed=args.cleanup_removed or base.cleanup_removed,
        unpruned_events=args.unpruned_events or base.unpruned_events,
    )


# --- Database and Django ---------------------------------------------------------------------


def with_database(url: str, name: str) -> str:
    return urlsplit(url)._replace(path=f"/{name}").geturl()


def recreate_database(server_url: str, name: str) -> str:
    import psycopg
    from psycopg import sql

    with psycopg.connect(with_database(server_url, "postgres"), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_database(server_url, name)


def configure_django(url: str) -> None:
    os.environ["DATABASE_URL"] = url
    # The example project's settings plus bench.tracked, the flush_model_* benchmarks' model.
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.django_settings"
    os.environ["DEBUG"] = "False"  # DEBUG keeps every query in memory
    import django

    django.setup()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


# --- Results ---------------------------------------------------------------------------------


@dataclass
class Target:
    # "ratio_min" (runs_app/raw, or raw/runs_app for lower-is-better rows), "slower_max"
    # (lower-is-better: runs_app at most ``value`` times raw), "app_min", "app_max" (strict),
    # "app_le", "info"
    kind: str
    value: float = 0.0
    unit: str = ""

    def text(self) -> str:
        if self.kind == "ratio_min":
            return f">= {self.value:.2f}"
        if self.kind == "slower_max":
            return f"<= {self.value:g}x raw"
        if self.kind == "app_min":
            return f"runs_app >= {self.value:g}{self.unit}"
        if self.kind == "app_max":
            return f"runs_app < {self.value:g}{self.unit}"
        if self.kind == "app_le":
            return f"runs_app <= {self.value:g}{self.unit}"
        return "-"


@dataclass
class Row:
    name: str
    title: str
    unit: str
    target: Target
    raw: float | None = None
    app: float | None = None
    higher_is_better: bool = True
    note: str = ""
    raw_samples: list[float] = field(default_factory=list)
    app_samples: list[float] = field(default_factory=list)
    # The peers (--peers): runs_app / best peer must be >= peer_target (None: no peer target).
    peer_target: float | None = None
    peer: float | None = None
    peer_name: str = ""
    peers: dict[str, str] = field(default_factory=dict)  # peer -> its median, or "n/a (why)"

    @property
    def ratio(self) -> float | None:
        if self.raw is None or self.app is None or not self.raw or not self.app:
            return None
        return self.app / self.raw if self.higher_is_better else self.raw / self.app

    @property
    def peer_ratio(self) -> float | None:
        if self.peer is None or self.app is None or not self.peer:
            return None
        return self.app / self.peer

    def raw_status(self) -> str:
        if self.target.kind == "info":
            return "info"
        if self.app is None:
            return "n/a"
        if self.target.kind in ("ratio_min", "slower_max"):
            ratio = self.ratio
            need = self.target.value if self.target.kind == "ratio_min" else 1 / self.target.value
            return "n/a" if ratio is None else ("pass" if ratio >= need - 1e-9 else "FAIL")
        if self.target.kind == "app_min":
            return "pass" if self.app >= self.target.value else "FAIL"
        if self.target.kind == "app_le":
            return "pass" if self.app <= self.target.value else "FAIL"
        return "pass" if self.app < self.target.value else "FAIL"

    def peer_status(self) -> str:
        if self.peer_target is None or self.peer_ratio is None:
            return "n/a"
        return "pass" if self.peer_ratio >= self.peer_target else "FAIL"

    @property
    def status(self) -> str:
        """The raw target's result; a FAIL against the best peer (when measured) fails it too."""
        status = self.raw_status()
        if self.peer_status() == "FAIL" and status in ("pass", "info", "n/a"):
            return "FAIL"
        return status

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            target=self.target.text(),
            ratio=self.ratio,
            peer_ratio=self.peer_ratio,
            status=self.status,
        )
        return data


def median_or_none(samples: Sequence[float]) -> float | None:
    return statistics.median(samples) if samples else None


def number(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit in ("ms", "MB", "x"):
        return f"{value:,.1f}" if unit != "x" else f"{value:.2f}"
    return f"{value:,.0f}"


def markdown_table(
    header: Sequence[str], lines: Sequence[Sequence[str]], right: Callable[[int], bool]
) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines, strict=True)]
    out = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for line in lines:
        cells = [
            cell.rjust(width) if right(index) else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def render_table(rows: Sequence[Row], *, with_peers: bool = True) -> str:
    """The main table: runs_app against raw psycopg and (when any row has one) the best peer."""
    peers = with_peers and any(row.peer_target is not None or row.peers for row in rows)
    header = ["operation", "unit", "raw (median)", "runs_app (median)", "ratio", "target"]
    if peers:
        header += ["best peer (median)", "vs peer", "peer target"]
    header.append("result")
    lines = []
    for row in rows:
        line = [
            row.title,
            row.unit,
            number(row.raw, row.unit),
            number(row.app, row.unit),
            "n/a" if row.ratio is None else f"{row.ratio:.2f}",
            row.target.text(),
        ]
        if peers:
            best = (
                f"{number(row.peer, row.unit)} ({row.peer_name})"
                if row.peer is not None
                else ("n/a" if row.peers or row.peer_target is not None else "-")
            )
            line += [
                best,
                "-" if row.peer_ratio is None else f"{row.peer_ratio:.2f}",
                "-" if row.peer_target is None else f">= {row.peer_target:g}x",
            ]
        line.append(row.status)
        lines.append(line)
    numeric = {2, 3, 4, 7} if peers else {2, 3, 4}
    out = markdown_table(header, lines, lambda index: index in numeric)
    notes = [f"- {row.title}: {row.note}" for row in rows if row.note]
    return "\n".join(out + (["", *notes] if notes else []))


def render_peer_table(rows: Sequence[Row], peer_names: Sequence[str]) -> str:
    """Every contender's median per operation that has peers: runs_app, raw, each peer."""
    header = ["operation", "unit", "runs_app", "raw", *peer_names]
    lines = [
        [row.title, row.unit, number(row.app, row.unit), number(row.raw, row.unit)]
        + [row.peers.get(name, "-") for name in peer_names]
        for row in rows
        if row.peers
    ]
    return "\n".join(markdown_table(header, lines, lambda index: index >= 2))


# --- Worker processes ------------------------------------------------------------------------


def _worker(prepare: Callable[[], Callable[[], int]], start: Any, queue: Any) -> None:
    from bench.publishers import monotonic_now

    try:
        work = prepare()
        queue.put(("ready", 0, 0.0, ""))
        if not start.wait(300):
            raise TimeoutError("never told to start")
        done = work()
        queue.put(("done", done, monotonic_now(), ""))
    except BaseException:
        queue.put(("error", 0, 0.0, traceback.format_exc()))


def run_workers(
    prepare: Callable[[], Callable[[], int]], processes: int, timeout: float = 600
) -> tuple[int, float]:
    """Fork ``processes`` workers that each ``prepare()`` (connect) and then, all at once, run
    the callable it returned. Returns (sum of their results, seconds from start to last end).

    Forked after closing every connection of this process, so none is shared with a child.
    """
    from django.db import connections

    from bench.publishers import monotonic_now

    connections.close_all()
    context = multiprocessing.get_context("fork")
    start = context.Event()
    queue = context.Queue()
    workers = [
        context.Process(target=_worker, args=(prepare, start, queue)) for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        reports: list[tuple[str, int, float, str]] = []
        for phase in ("ready", "done"):
            if phase == "done":
                began = monotonic_now()
                start.set()
            reports = [queue.get(timeout=timeout) for _ in workers]
            errors = [report[3] for report in reports if report[0] == "error"]
            if errors:
                raise RuntimeError(f"a worker failed:\n{errors[0]}")
        for worker in workers:
            worker.join(timeout)
        return sum(report[1] for report in reports), max(r[2] for r in reports) - began
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join(10)


class PipeReader:
    """Reads ``"<message id> <time>"`` lines written by bench.publishers.PipePublisher."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""
        self.seen: dict[str, float] = {}

    def wait_for(self, message_id: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while message_id not in self.seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{message_id} not published within {timeout:g} s")
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise EOFError(f"the relay exited before publishing {message_id}")
            *lines, self.buffer = (self.buffer + chunk).split(b"\n")
            for line in lines:
                published_id, at = line.decode().split()
                self.seen.setdefault(published_id, float(at))
        return self.seen[message_id]


# --- The benchmarks --------------------------------------------------------------------------


def project_stream(count: int, version: int) -> Iterator[dict[str, Any]]:
    """The source both sides flush: keys as bench.raw.project_key, a small JSON object each."""
    for index in range(count):
        yield {
            "key": f"k{index:09d}",
            "name": f"Project {index}",
            "data": {"n": index, "v": version},
        }


def repo_stream(count: int, version: int, owners: int) -> Iterator[dict[str, Any]]:
    """The source of the flush_model_* benchmarks: a user's rows of eight typed columns, keys as
    bench.raw.REPO_KEY_BASE + index, the foreign key by id; ``version`` changes every value but
    the key."""
    from bench.raw import REPO_KEY_BASE

    pushed = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(days=version)
    for index in range(count):
        owner = index % owners + 1
        yield {
            "github_id": REPO_KEY_BASE + index,
            "name": f"repo-{index}-v{version}",
            "url": f"https://github.com/owner-{owner}/repo-{index}",
            "stars": index % 10_000 + version,
            "archived": (index + version) % 7 == 0,
            "owner_id": owner,
            "pushed_at": pushed + timedelta(seconds=index),
            "node_id": uuid.UUID(int=(version << 64) | index),
        }


def event_stream(count: int) -> Iterator[dict[str, Any]]:
    for index in range(count):
        yield {"type": "bench.event", "payload": {"n": index, "source": "bench"}}


class Bench:
    def __init__(self, url: str, sizes: Sizes) -> None:
        from bench import raw

        self.url = url
        self.sizes = sizes
        self.raw = raw
        self._conn: Any = None
        self._model_tables = False

    @property
    def conn(self) -> Any:
        if self._conn is None or self._conn.closed:
            self._conn = self.raw.connect(self.url)
        return self._conn

    def close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def count(self, sql: str, *params: Any) -> int:
        result: int = self.raw.count(self.conn, sql, params)
        return result

    def expect(self, what: str, actual: int, expected: int) -> None:
        if actual != expected:
            raise AssertionError(f"{what}: {actual}, expected {expected}")

    def alternate(self, rounds: dict[str, Callable[[], float] | None]) -> dict[str, list[float]]:
        """Run each side once per round, the order reversed every other round."""
        samples: dict[str, list[float]] = {side: [] for side in rounds}
        order = list(rounds)
        for index in range(self.sizes.rounds):
            for side in order if index % 2 == 0 else reversed(order):
                measure = rounds[side]
                if measure is not None:
                    rate = measure()
                    samples[side].append(rate)
                    log(f"    round {index + 1} {side}: {rate:,.1f}")
        return samples

    def row(self, row: Row, samples: dict[str, list[float]], raw_key: str, app_key: str) -> Row:
        row.raw_samples, row.app_samples = samples[raw_key], samples.get(app_key, [])
        row.raw, row.app = median_or_none(row.raw_samples), median_or_none(row.app_samples)
        return row

    def fresh_run(self, scope: str, run_id: str) -> Any:
        from runs_app import services

        return services.create_run(scope, run_id=run_id)

    def mark_flushed(self, run_id: str, rows: int, model: str = "runs_app.project") -> None:
        """What a successful flush of ``model`` (its label) leaves on the ledger, for setups that
        seed rows directly."""
        from django.utils import timezone

        from runs_app.models import FlushStatus, RunModelState, RunState

        RunState.objects.filter(run_id=run_id).update(
            flush_status=FlushStatus.SUCCEEDED,
            rows_seen=rows,
            rows_created=rows,
            flushed_at=timezone.now(),
        )
        RunModelState.objects.create(
            run_id=run_id,
            model=model,
            flush_status=FlushStatus.SUCCEEDED,
            rows_seen=rows,
            rows_created=rows,
        )

    # flush ------------------------------------------------------------------------------------

    def flush(self, update: bool) -> Row:
        from runs_app import services
        from runs_app.conf import runs_settings
        from runs_app.services import fail_run

        rows = self.sizes.rows
        batch = int(runs_settings.FLUSH_BATCH_SIZE)

        def measure(side: str) -> float:
            self.raw.reset(self.conn)
            if update:
                old = self.fresh_run(SCOPE, "flush-old")
                # 90% of the keys exist (every index not divisible by 10), seen by an older run.
                self.raw.seed_projects(self.conn, SCOPE, old.pk, 0, rows, every=10)
                fail_run(old)
            run = self.fresh_run(SCOPE, "flush")
            self.raw.settle(self.conn)
            projects = project_stream(rows, version=1)
            began = time.perf_counter()
            if side == "raw":
                self.raw.flush(self.conn, run.pk, SCOPE, projects, batch)
            else:
                services.flush_projects(run, projects)
            elapsed = time.perf_counter() - began
            self.expect(
                "projects stamped with the run",
                self.count(
                    "SELECT count(*) FROM runs_app_project WHERE last_seen_run_id = %s", run.pk
                ),
                rows,
            )
            return rows / elapsed

        samples = self.alternate({"raw": lambda: measure("raw"), "app": lambda: measure("app")})
        what = "update pass, 90% existing" if update else "insert pass"
        row = Row(
            "flush_update" if update else "flush_insert",
            f"flush_projects {rows:,} rows, {what}",
            "rows/s",
            Target("ratio_min", 0.7),
        )
        return self.row(row, samples, "raw", "app")

    # flush a user's tracked model -------------------------------------------------------------

    def flush_model(self, update: bool) -> Row:
        """Issue 11: ``services.flush(run, BenchRepo)`` against raw COPY + upsert, one transaction
        per 1,000 rows on both sides, into the same table. The insert pass starts from an empty
        table, the update pass from every key present (seen by an older, failed run). The rows
        are built before the clock starts (the same list for both sides): only the flush is
        timed. runs_app's run is then completed (untimed; its rate is in the row's note)."""
        from bench.tracked.models import BenchRepo, create_tables
        from runs_app import services

        rows, owners = self.sizes.rows, MODEL_OWNERS
        tables = (self.raw.REPO, self.raw.OWNER)
        if not self._model_tables:
            create_tables()
            self._model_tables = True
        source = list(repo_stream(rows, version=1, owners=owners))
        confirm_rates: list[float] = []

        def measure(side: str) -> float:
            self.raw.reset(self.conn, *tables)
            self.raw.seed_owners(self.conn, owners)
            if update:
                old = self.fresh_run(SCOPE, "model-old")
                self.raw.seed_repos(self.conn, old.pk, rows, owners)
                services.fail_run(old)
            run = self.fresh_run(SCOPE, "model")
            self.raw.settle(self.conn, *tables)
            began = time.perf_counter()
            if side == "raw":
                created, updated = self.raw.flush_repos(self.conn, run.pk, source, MODEL_BATCH)
            else:
                with services.flush(run, BenchRepo, batch_size=MODEL_BATCH) as session:
                    written = session.write(source)
                created, updated = written.created, written.updated
            elapsed = time.perf_counter() - began
            self.expect("rows created", created, 0 if update else rows)
            self.expect("rows updated", updated, rows if update else 0)
            self.expect(
                "rows stamped with the run",
                self.count(
                    f"SELECT count(*) FROM {self.raw.REPO} WHERE last_seen_run_id = %s", run.pk
                ),
                rows,
            )
            if side == "app":
                confirming = time.perf_counter()
                services.complete_run(run)
                confirm_rates.append(rows / (time.perf_counter() - confirming))
                self.expect(
                    "rows confirmed by complete_run",
                    self.count(
                        f"SELECT count(*) FROM {self.raw.REPO} WHERE last_confirmed_run_id = %s",
                        run.pk,
                    ),
                    rows,
                )
            return rows / elapsed

        samples = self.alternate({"raw": lambda: measure("raw"), "app": lambda: measure("app")})
        what = "update pass, all existing" if update else "insert pass"
        confirmed = median_or_none(confirm_rates)
        row = Row(
            "flush_model_update" if update else "flush_model_insert",
            f"flush(run, BenchRepo) {rows:,} rows, 8 typed columns, {what}",
            "rows/s",
            Target("ratio_min", 0.8),
            note=f"{MODEL_BATCH:,} rows per transaction on both sides (raw: binary COPY into a"
            " temporary table + INSERT ... SELECT ... ON CONFLICT); complete_run afterwards"
            f" (untimed) confirmed {number(confirmed, 'rows/s')} rows/s",
        )
        return self.row(row, samples, "raw", "app")

    # confirm ----------------------------------------------------------------------------------

    def confirm(self) -> Row:
        from runs_app import services

        rows = self.sizes.rows

        def measure(side: str) -> float:
            self.raw.reset(self.conn)
            run = self.fresh_run(SCOPE, "confirm")
            self.raw.seed_projects(self.conn, SCOPE, run.pk, 0, rows)
            self.mark_flushed(run.pk, rows)
            self.raw.settle(self.conn)
            began = time.perf_counter()
            if side == "raw":
                self.raw.confirm(self.conn, run.pk, SCOPE)
            else:
                services.complete_run(run)
            elapsed = time.perf_counter() - began
            self.expect(
                "projects confirmed",
                self.count(
                    "SELECT count(*) FROM runs_app_project WHERE last_confirmed_run_id = %s", run.pk
                ),
                rows,
            )
            return rows / elapsed

        samples = self.alternate({"raw": lambda: measure("raw"), "app": lambda: measure("app")})
        row = Row(
            "confirm", f"complete_run confirming {rows:,} rows", "rows/s", Target("ratio_min", 0.5)
        )
        return self.row(row, samples, "raw", "app")

    # cleanup ----------------------------------------------------------------------------------

    def cleanup(self) -> list[Row]:
        """At each size: remove ``n`` rows from a scope of ``10 n`` (issue 10's target: a batch's
        cost must not grow with the scope)."""
        return [self.cleanup_at(removed) for removed in self.sizes.cleanup_removed]

    def cleanup_at(self, stale: int) -> Row:
        from runs_app import services
        from runs_app.conf import runs_settings

        rows = 10 * stale
        batch = int(runs_settings.CLEANUP_BATCH_SIZE)

        def measure(side: str) -> float:
            self.raw.reset(self.conn)
            old = self.fresh_run(SCOPE, "cleanup-old")
            services.fail_run(old)
            run = self.fresh_run(SCOPE, "cleanup")
            self.raw.seed_projects(self.conn, SCOPE, old.pk, 0, stale)
            self.raw.seed_projects(self.conn, SCOPE, run.pk, stale, rows)
            self.mark_flushed(run.pk, rows - stale)
            services.complete_run(run)
            self.raw.settle(self.conn)
            began = time.perf_counter()
            if side == "raw":
                self.raw.cleanup(self.conn, run.pk, SCOPE, batch)
            else:
                services.safe_cleanup_old_projects(run)
            elapsed = time.perf_counter() - began
            self.expect(
                "projects left",
                self.count("SELECT count(*) FROM runs_app_project WHERE scope = %s", SCOPE),
                rows - stale,
            )
            return stale / elapsed

        samples = self.alternate({"raw": lambda: measure("raw"), "app": lambda: measure("app")})
        row = Row(
            "cleanup",
            f"safe_cleanup_old_projects {stale:,} of {rows:,} rows",
            "rows/s",
            Target("ratio_min", 0.7),
        )
        return self.row(row, samples, "raw", "app")

    # soft cleanup and restore of a user's tracked model ---------------------------------------

    def model_tables(self) -> tuple[str, ...]:
        """bench.tracked's tables, created once per benchmark process (later rounds TRUNCATE)."""
        from bench.tracked.models import create_tables

        if not self._model_tables:
            create_tables()
            self._model_tables = True
        return (self.raw.REPO, self.raw.SOFT_REPO, self.raw.OWNER)

    def seed_stale(self, model: Any, table: str, stale: int, rows: int) -> Any:
        """Untimed: ``rows`` rows of ``table`` (raw inserts), the first ``stale`` last seen by an
        older (failed) run, the others by a run that flushed them (its ledger lines, as
        ``mark_flushed``) and completed. Returns that run, ready to clean up."""
        from runs_app import services
        from runs_app.tracking import model_label

        self.raw.reset(self.conn, *self.model_tables())
        self.raw.seed_owners(self.conn, MODEL_OWNERS)
        old = self.fresh_run(SCOPE, "cleanup-old")
        services.fail_run(old)
        run = self.fresh_run(SCOPE, "cleanup")
        self.raw.seed_repos(self.conn, old.pk, stale, MODEL_OWNERS, table=table)
        self.raw.seed_repos(self.conn, run.pk, rows - stale, MODEL_OWNERS, start=stale, table=table)
        self.mark_flushed(run.pk, rows - stale, model_label(model))
        services.complete_run(run)
        return run

    def cleanup_soft(self) -> Row:
        """Issue 12: ``safe_cleanup(run, BenchSoftRepo)`` tombstoning a tenth of the table
        against raw batched ``UPDATE ... SET deleted_at ... RETURNING``, the same batch size,
        each batch audited as one event."""
        from bench.tracked.models import BenchSoftRepo
        from runs_app import services
        from runs_app.conf import runs_settings
        from runs_app.tracking import model_label, sync_spec

        rows = self.sizes.rows
        stale = max(1, rows // 10)
        batch = int(runs_settings.CLEANUP_BATCH_SIZE)
        table = self.raw.SOFT_REPO
        event = f"{sync_spec(BenchSoftRepo).event_prefix}.removed"

        def measure(side: str) -> float:
            run = self.seed_stale(BenchSoftRepo, table, stale, rows)
            self.raw.settle(self.conn, *self.model_tables())
            began = time.perf_counter()
            if side == "raw":
                removed = self.raw.cleanup_soft(
                    self.conn,
                    run.pk,
                    SCOPE,
                    batch,
                    event_type=event,
                    model=model_label(BenchSoftRepo),
                )
            else:
                removed = services.safe_cleanup(run, BenchSoftRepo).removed
            elapsed = time.perf_counter() - began
            self.expect("rows tombstoned", removed, stale)
            self.expect(
                "rows tombstoned by the run",
                self.count(
                    f"SELECT count(*) FROM {table} WHERE deleted_at IS NOT NULL"
                    " AND deleted_by_run_id = %s",
                    run.pk,
                ),
                stale,
            )
            self.expect(
                "rows left live",
                self.count(f"SELECT count(*) FROM {table} WHERE deleted_at IS NULL"),
                rows - stale,
            )
            self.expect(
                "rows in the audit",
                self.count(
                    f"SELECT coalesce(sum(jsonb_array_length(payload -> 'rows')), 0)"
                    f" FROM {self.raw.EVENT} WHERE run_id = %s AND type = %s",
                    run.pk,
                    event,
                ),
                stale,
            )
            return stale / elapsed

        samples = self.alternate({"raw": lambda: measure("raw"), "app": lambda: measure("app")})
        row = Row(
            "cleanup_soft",
            f"safe_cleanup(run, BenchSoftRepo) tombstoning {stale:,} of {rows:,} rows",
            "rows/s",
            Target("ratio_min", 0.7),
            note=f"{batch:,} rows per transaction on both sides (raw: UPDATE ... SET deleted_at"
            " ... RETURNING row_to_json, one audit event per batch)",
        )
        return self.row(row, samples, "raw", "app")

    def restore(self) -> Row:
        """Issue 12: ``restore_cleanup(run, BenchRepo)`` putting back the rows a cleanup deleted
        (a tenth of the table), against raw ``INSERT ... SELECT`` from the same audit events'
        JSON (``jsonb_populate_recordset``, one statement per event, one transaction). The
        cleanup before is untimed."""
        from bench.tracked.models import BenchRepo
        from runs_app import services
        from runs_app.tracking import sync_spec

        rows = self.sizes.rows
        stale = max(1, rows // 10)
        table = self.raw.REPO
        event = f"{sync_spec(BenchRepo).event_prefix}.removed"

        def measure(side: str) -> float:
            run = self.seed_stale(BenchRepo, table, stale, rows)
            self.expect("rows cleaned up", services.safe_cleanup(run, BenchRepo).removed, stale)
            self.raw.settle(self.conn, *self.model_tables())
            began = time.perf_counter()
            if side == "raw":
                restored = self.raw.restore_repos(self.conn, run.pk, event)
            else:
                result = services.restore_cleanup(run, BenchRepo)
                restored = result.restored
                self.expect("restore conflicts", result.conflicts, 0)
            elapsed = time.perf_counter() - began
            self.expect("rows restored", restored, stale)
            self.expect("rows back", self.count(f"SELECT count(*) FROM {table}"), rows)
            self.expect(
                "restored rows still stamped by the older run",
                self.count(
                    f"SELECT count(*) FROM {table} WHERE last_seen_run_id = %s", "cleanup-old"
                ),
                stale,
            )
            return stale / elapsed

        samples = self.alternate({"raw": lambda: measure("raw"), "app": lambda: measure("app")})
        row = Row(
            "restore",
            f"restore_cleanup(run, BenchRepo) {stale:,} deleted of {rows:,} rows",
            "rows/s",
            Target("ratio_min", 0.5),
            note="one transaction on both sides (raw: INSERT ... SELECT FROM"
            " jsonb_populate_recordset(audit event) ON CONFLICT DO NOTHING, one per event)",
        )
        return self.row(row, samples, "raw", "app")

    # append -----------------------------------------------------------------------------------

    def append(self, per_call: int) -> Row:
        from bench import app
        from runs_app import services
        from runs_app.conf import runs_settings

        total = self.sizes.append_one_events if per_call == 1 else self.sizes.events
        notify = ""

        def measure(side: str) -> float:
            nonlocal notify
            self.raw.reset(self.conn)
            run = self.fresh_run(SCOPE, "append")
            if app.append_notifies(run):
                notify = str(runs_settings.NOTIFY_CHANNEL)
            events = list(event_stream(total))
            calls = [events[i : i + per_call] for i in range(0, total, per_call)]
            self.raw.settle(self.conn)
            began = time.perf_counter()
            if side == "raw" and per_call == 1:
                for (event,) in calls:
                    self.raw.append_one(
                        self.conn, run.pk, event["type"], event["payload"], notify=notify
                    )
            elif side == "raw":
                for call in calls:
                    self.raw.append_many(self.conn, run.pk, call)
            else:
                for call in calls:
                    services.append_events(run, call)
            elapsed = time.perf_counter() - began
            self.expect(
                "events appended",
                self.count("SELECT count(*) FROM runs_app_runevent WHERE run_id = %s", run.pk),
                total + 2,  # run.started and the probe
            )
            return total / elapsed

        samples = self.alternate({"raw": lambda: measure("raw"), "app": lambda: measure("app")})
        row = Row(
            f"append_{per_call}",
            f"append_events, {per_call} event{'s' if per_call > 1 else ''} per call ({total:,})",
            "events/s",
            Target("ratio_min", 0.8 if per_call == 1 else 0.6),
            note="raw appender NOTIFYs too, as runs_app does" if notify and per_call == 1 else "",
            peer_target=1.0 if per_call == 1 else None,
        )
        return self.row(row, samples, "raw", "app")

    # drain ------------------------------------------------------------------------------------

    def drain_worker(self, side: str) -> Callable[[], Callable[[], int]]:
        """What a drain worker process runs: raw relay passes, or runs_app's drain_outbox_once."""
        from bench import app
        from bench.publishers import NoopPublisher
        from runs_app.conf import runs_settings

        url, raw = self.url, self.raw
        batch = int(runs_settings.DRAIN_BATCH_SIZE)

        def prepare() -> Callable[[], int]:
            if side == "raw":
                conn = raw.connect(url)
                publisher = NoopPublisher()
                return lambda: raw.drain(conn, publisher, runs=batch, events=batch)
            from django.db import connection

            connection.ensure_connection()
            return app.drain_all

        return prepare

    def drain_round(
        self, side: str, processes: int, runs: int, per_run: int, *, reset: bool = True
    ) -> float:
        """Seed ``runs`` x ``per_run`` pending events (unless ``reset`` is False: the caller
        seeded them) and drain them with ``processes`` workers; returns events/s."""
        if reset:
            self.raw.reset(self.conn)
            self.raw.seed_outbox(self.conn, runs, per_run)
        total = runs * per_run
        self.raw.settle(self.conn)
        self.close_conn()
        published, elapsed = run_workers(self.drain_worker(side), processes)
        self.expect("events published", published, total)
        self.expect(
            "events left pending",
            self.count("SELECT count(*) FROM runs_app_runevent WHERE published_at IS NULL"),
            0,
        )
        return total / elapsed

    def drain(self) -> list[Row]:

        runs, per_run = self.sizes.runs, self.sizes.events_per_run
        total = runs * per_run
        rounds: dict[str, Callable[[], float] | None] = {
            f"{side}{processes}": partial(self.drain_round, side, processes, runs, per_run)
            for side in ("raw", "app")
            for processes in (1, 2)
        }
        samples = self.alternate(rounds)
        what = f"{total:,} events over {runs:,} runs"
        one = self.row(
            Row(
                "drain_1",
                f"drain_outbox_once, 1 process, {what}",
                "events/s",
                Target("ratio_min", 0.8),
                peer_target=15.0,
            ),
            samples,
            "raw1",
            "app1",
        )
        two = self.row(
            Row("drain_2", f"drain_outbox_once, 2 processes, {what}", "events/s", Target("info")),
            samples,
            "raw2",
            "app2",
        )
        scaling = Row(
            "drain_scaling",
            "drain: 2 processes / 1 process",
            "x",
            Target("app_min", 1.5, "x"),
            raw=(two.raw / one.raw) if two.raw and one.raw else None,
            app=(two.app / one.app) if two.app and one.app else None,
        )
        return [one, two, scaling]

    def drain_per_run(self) -> Row:

        runs = self.sizes.per_run_runs
        samples = self.alternate(
            {
                "raw": lambda: self.drain_round("raw", 1, runs, 1),
                "app": lambda: self.drain_round("app", 1, runs, 1),
            }
        )
        row = Row(
            "drain_per_run",
            f"drain_outbox_once, 1 process, 1 event per run ({runs:,} runs)",
            "events/s",
            Target("ratio_min", 0.7),
            peer_target=3.0,
        )
        return self.row(row, samples, "raw", "app")

    def drain_passes(self, side: str) -> list[tuple[int, float]]:
        """Drain in this process, pass by pass: (events published, seconds) per non-empty pass."""
        from bench import app
        from bench.publishers import NoopPublisher
        from runs_app.conf import runs_settings

        batch = int(runs_settings.DRAIN_BATCH_SIZE)
        publisher = NoopPublisher()
        passes: list[tuple[int, float]] = []
        if side == "raw":
            with self.raw.connect(self.url) as conn:
                while True:
                    began = time.perf_counter()
                    published = self.raw.drain_pass(conn, publisher, runs=batch, events=batch)
                    if not published:
                        return passes
                    passes.append((published, time.perf_counter() - began))
        from django.db import connection

        connection.ensure_connection()
        while True:
            began = time.perf_counter()
            published = app.drain_pass(publisher)
            if not published:
                return passes
            passes.append((published, time.perf_counter() - began))

    def drain_backlog(self) -> list[Row]:
        """A backlog of 1 event per run at each size: the rate, and how much slower the last
        passes are than the first (a tenth of the passes at each end, at least one)."""
        rows = []
        for runs in self.sizes.backlog_runs:
            rows += self.drain_backlog_at(runs)
        return rows

    def drain_backlog_at(self, runs: int) -> list[Row]:
        slowdown: dict[str, list[float]] = {"raw": [], "app": []}
        pass_ms: dict[str, list[tuple[float, float]]] = {"raw": [], "app": []}

        def measure(side: str) -> float:
            self.raw.reset(self.conn)
            total: int = self.raw.seed_outbox(self.conn, runs, 1)
            self.raw.settle(self.conn)
            self.close_conn()
            began = time.perf_counter()
            passes = self.drain_passes(side)
            elapsed = time.perf_counter() - began
            self.expect("events published", sum(n for n, _ in passes), total)
            self.expect(
                "events left pending",
                self.count("SELECT count(*) FROM runs_app_runevent WHERE published_at IS NULL"),
                0,
            )
            edge = max(1, len(passes) // 10)
            first = statistics.median(t for _, t in passes[:edge])
            last = statistics.median(t for _, t in passes[-edge:])
            slowdown[side].append(last / first)
            pass_ms[side].append((first * 1000, last * 1000))
            return total / elapsed

        def ms(side: str) -> str:
            first = statistics.median(f for f, _ in pass_ms[side])
            last = statistics.median(la for _, la in pass_ms[side])
            return f"{side} {first:.1f} -> {last:.1f} ms"

        samples = self.alternate({"raw": partial(measure, "raw"), "app": partial(measure, "app")})
        rate = self.row(
            Row(
                f"drain_backlog_{runs}",
                f"drain backlog, 1 event per run, {runs:,} runs",
                "events/s",
                Target("ratio_min", 0.7),
            ),
            samples,
            "raw",
            "app",
        )
        passes = self.row(
            Row(
                f"drain_backlog_{runs}_slowdown",
                f"drain backlog {runs:,} runs: last passes / first passes (time)",
                "x",
                Target("app_le", 2.0, "x"),
                higher_is_better=False,
                note=f"median pass, first -> last tenth of the passes: {ms('raw')}, {ms('app')}",
            ),
            slowdown,
            "raw",
            "app",
        )
        return [rate, passes]

    def drain_unpruned(self) -> list[Row]:
        """Drain 1 event per run with the outbox's history pruned (finished runs, no events) and
        then with ``unpruned_events`` published events of those runs left in the table."""
        runs = self.sizes.per_run_runs
        history = self.sizes.unpruned_runs
        per = self.sizes.unpruned_events // history
        self.raw.reset(self.conn)
        self.raw.seed_history(self.conn, history, per, with_events=False)

        def measure(side: str) -> float:
            self.raw.delete_runs(self.conn, "drain-")
            self.raw.seed_outbox(self.conn, runs, 1)
            return self.drain_round(side, 1, runs, 1, reset=False)

        def rounds() -> dict[str, list[float]]:
            return self.alternate({"raw": partial(measure, "raw"), "app": partial(measure, "app")})

        empty = rounds()
        log(f"    seeding {history * per:,} published events over {history:,} finished runs")
        began = time.perf_counter()
        self.raw.delete_runs(self.conn, "drain-")
        self.raw.seed_history_events(self.conn, history, per)
        log(f"    seeded in {time.perf_counter() - began:.0f} s")
        loaded = rounds()
        title = f"drain 1 event per run ({runs:,} runs), {history * per:,} events unpruned"
        row = Row("drain_unpruned", title, "events/s", Target("info"))
        rate = self.row(row, loaded, "raw", "app")
        medians = {
            side: (median_or_none(loaded[side]), median_or_none(empty[side]))
            for side in ("raw", "app")
        }
        ratio = {
            side: (full / none if full and none else None) for side, (full, none) in medians.items()
        }
        empty_text = ", ".join(
            f"{side} {number(none, 'events/s')} events/s" for side, (_, none) in medians.items()
        )
        versus = Row(
            "drain_unpruned_vs_empty",
            f"drain with {history * per:,} published events unpruned / pruned table",
            "x",
            Target("app_min", 0.8, "x"),
            raw=ratio["raw"],
            app=ratio["app"],
            note=f"pruned table (same {history:,} finished runs, no events): {empty_text}",
        )
        return [rate, versus]

    # latency ----------------------------------------------------------------------------------

    def latency_samples(self, side: str) -> list[float]:
        """Milliseconds from the start of an append (before its transaction) to the moment the
        relay hands the event to its publisher."""
        from bench.publishers import PipePublisher, monotonic_now
        from runs_app import services
        from runs_app.conf import runs_settings

        channel = str(runs_settings.NOTIFY_CHANNEL)
        batch = int(runs_settings.DRAIN_BATCH_SIZE)
        self.raw.reset(self.conn)
        run = self.fresh_run(SCOPE, f"latency-{side}")
        read_fd, write_fd = os.pipe()
        reader = PipeReader(read_fd)
        stop_raw: Any = None
        relay: Any = None
        try:
            if side == "raw":
                from django.db import connections

                connections.close_all()
                self.close_conn()
                context = multiprocessing.get_context("fork")
                stop_raw = context.Event()
                relay = context.Process(
                    target=self.raw.listen_and_drain,
                    args=(self.url, channel, PipePublisher(write_fd)),
                    kwargs={"runs": batch, "events": batch, "stop": stop_raw},
                )
                relay.start()
            else:
                relay = subprocess.Popen(
                    [sys.executable, "manage.py", "drain_outbox", "--settings", "bench.settings"],
                    cwd=ROOT,
                    env={**os.environ, "DATABASE_URL": self.url, "BENCH_LATENCY_FD": str(write_fd)},
                    pass_fds=(write_fd,),
                    stdout=subprocess.DEVNULL,  # its exit summary; errors still reach stderr
                )
            os.close(write_fd)
            write_fd = -1
            # Warm-up: the run's first events published means the relay is up and listening.
            reader.wait_for(f"{run.pk}:{run.last_seq}", timeout=60)
            samples = []
            pause = random.Random(7)
            for index in range(self.sizes.latency_samples):
                # A random pause first, so each append finds the relay idle (waiting on LISTEN or
                # between polls) at a random phase, not still busy with the previous event.
                time.sleep(pause.uniform(0.02, 0.1))
                payload = {"n": index}
                began = monotonic_now()
                if side == "raw":
                    seq = self.raw.append_one(
                        self.conn, run.pk, "bench.latency", payload, notify=channel
                    )
                else:
                    appended = services.append_events(
                        run, [{"type": "bench.latency", "payload": payload}]
                    )
                    seq = appended[0].seq
                published = reader.wait_for(f"{run.pk}:{seq}", timeout=60)
                samples.append((published - began) * 1000)
            return samples
        finally:
            if write_fd >= 0:
                os.close(write_fd)
            if side == "raw" and relay is not None:
                stop_raw.set()
                relay.join(30)
                if relay.is_alive():
                    relay.terminate()
            elif relay is not None:
                relay.send_signal(signal.SIGTERM)
                try:
                    relay.wait(60)
                except subprocess.TimeoutExpired:
                    relay.kill()
                    relay.wait()
            os.close(read_fd)

    def latency(self) -> list[Row]:

        raw_samples = self.latency_samples("raw")
        app_samples = self.latency_samples("app")

        def quantile(samples: list[float], q: int) -> float | None:
            if len(samples) < 2:
                return samples[0] if samples else None
            return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]

        rows = []
        for q, target in ((50, Target("slower_max", 2)), (99, Target("slower_max", 3))):
            rows.append(
                Row(
                    f"latency_p{q}",
                    f"append -> publish latency p{q}, listening relay",
                    "ms",
                    target,
                    raw=quantile(raw_samples, q),
                    app=quantile(app_samples, q),
                    higher_is_better=False,
                    raw_samples=raw_samples if q == 50 else [],
                    app_samples=app_samples if q == 50 else [],
                )
            )
        return rows

    # memory -----------------------------------------------------------------------------------

    def memory(self) -> Row:

        results: dict[str, float] = {}
        notes = []
        for side in ("raw", "app"):
            self.raw.reset(self.conn)
            self.raw.settle(self.conn)
            child = subprocess.run(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--memory-child",
                    side,
                    "--memory-rows",
                    str(self.sizes.memory_rows),
                    "--database-url",
                    self.url,
                ],
                capture_output=True,
                text=True,
                check=False,
                timeout=1800,
            )
            if child.returncode:
                raise RuntimeError(f"memory child {side} failed:\n{child.stderr}")
            report = json.loads(child.stdout.strip().splitlines()[-1])
            results[side] = report["peak_mb"]
            notes.append(
                f"{side} peak {report['peak_mb']:.1f} MB from {report['baseline_mb']:.1f} MB"
                f" before the flush ({report['rows_per_s']:,.0f} rows/s)"
            )
            log(f"    {notes[-1]}")
        rows = self.sizes.memory_rows
        return Row(
            "memory",
            f"peak RSS flushing {rows:,} projects from a generator",
            "MB",
            Target("app_max", 200, " MB"),
            raw=results.get("raw"),
            app=results.get("app"),
            higher_is_better=False,
            note="; ".join(notes),
        )

    def drain_memory(self) -> Row:
        """Issue 14: peak RSS of ``drain_outbox --once`` over runs x events whose payloads are
        about ``MAX_PAYLOAD_BYTES`` (256 KiB) each: a claim's read is bounded in bytes
        (``DRAIN_MAX_BYTES``), not only in events, so the relay never holds a whole claim's
        payloads at once. Seeded untimed; the drain runs in a fresh process."""
        from runs_app.conf import runs_settings

        runs, per = self.sizes.drain_memory
        blob = int(runs_settings.MAX_PAYLOAD_BYTES) - 64  # the object's braces and key
        self.raw.reset(self.conn)
        events = self.raw.seed_outbox(self.conn, runs, per, prefix="mem")
        with self.conn.transaction(), self.conn.cursor() as cursor:
            cursor.execute(
                "UPDATE runs_app_runevent SET payload = jsonb_build_object('blob', "
                "repeat(md5(seq::text || run_id), %s / 32)) WHERE run_id LIKE 'mem-%%'",
                (blob,),
            )
        self.raw.settle(self.conn)
        child = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--drain-memory-child",
                "--database-url",
                self.url,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=3600,
        )
        if child.returncode:
            raise RuntimeError(f"drain memory child failed:\n{child.stderr}")
        report = json.loads(child.stdout.strip().splitlines()[-1])
        self.expect(
            "events published",
            self.count(
                "SELECT count(*) FROM runs_app_runevent "
                "WHERE run_id LIKE %s AND published_at IS NOT NULL",
                "mem-%",
            ),
            events,
        )
        note = (
            f"{runs} runs x {per} events of {blob / 1024:,.0f} KiB ({events * blob / 2**30:.1f} "
            f"GiB of payloads); peak {report['peak_mb']:.1f} MB from {report['baseline_mb']:.1f} "
            f"MB at start, {report['seconds']:.1f} s; DRAIN_MAX_BYTES "
            f"{int(runs_settings.DRAIN_MAX_BYTES) // 2**20} MiB"
        )
        log(f"    {note}")
        return Row(
            "drain_memory",
            f"peak RSS of drain_outbox --once, {runs} runs x {per} events of 256 KiB",
            "MB",
            Target("app_max", 300, " MB"),
            app=report["peak_mb"],
            higher_is_better=False,
            note=note,
        )


def drain_memory_child(url: str) -> None:
    """``drain_outbox --once`` (the command, in this fresh process) over the seeded outbox of
    large payloads, publishing to a publisher that keeps nothing; print the process's peak
    RSS."""
    configure_django(url)
    from django.core.management import call_command
    from django.test import override_settings

    baseline = _status_mb("VmRSS")
    began = time.perf_counter()
    out = io.StringIO()
    with override_settings(RUNS_APP={"PUBLISHER": "bench.publishers.NoopPublisher"}):
        call_command("drain_outbox", "--once", stdout=out, stderr=out)
    report = {
        "peak_mb": _status_mb("VmHWM"),
        "baseline_mb": baseline,
        "seconds": time.perf_counter() - began,
        "output": out.getvalue().strip().splitlines()[-1:],
    }
    print(json.dumps(report))


def _status_mb(field_name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(side: str, url: str, rows: int) -> None:
    """Flush ``rows`` projects from a generator in this fresh process; print its peak RSS."""
    configure_django(url)
    from bench import raw
    from runs_app import services
    from runs_app.conf import runs_settings

    def status_mb(field_name: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    run = services.create_run(SCOPE, run_id=f"memory-{side}")
    baseline = status_mb("VmRSS")
    began = time.perf_counter()
    if side == "raw":
        with raw.connect(url) as conn:
            raw.flush(
                conn, run.pk, SCOPE, project_stream(rows, 1), int(runs_settings.FLUSH_BATCH_SIZE)
            )
    else:
        services.flush_projects(run, project_stream(rows, 1))
    elapsed = time.perf_counter() - began
    with raw.connect(url) as conn:
        flushed = raw.count(
            conn, "SELECT count(*) FROM runs_app_project WHERE last_seen_run_id = %s", (run.pk,)
        )
    if flushed != rows:
        raise AssertionError(f"{flushed} projects flushed, expected {rows}")
    report = {
        "peak_mb": status_mb("VmHWM"),
        "baseline_mb": baseline,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows_per_s": rows / elapsed,
    }
    print(json.dumps(report))


# --- Peers (--peers) -------------------------------------------------------------------------

PEERS_DIR = HERE / ".peers"  # git-ignored: one virtualenv per peer
PSYCOPG = "psycopg[binary]==3.3.9"
# name -> (driver in bench/peers/, what pip installs into its virtualenv from PyPI)
PEERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "procrastinate": ("procrastinate_driver.py", ("procrastinate==3.10.0", PSYCOPG)),
    "django-celery-outbox": ("celery_outbox_driver.py", ("django-celery-outbox==0.4.3", PSYCOPG)),
    "django-outbox-pattern": (
        "outbox_pattern_driver.py",
        ("django-outbox-pattern==3.2.1", PSYCOPG),
    ),
}
# The rows the peers are measured for (same names in the drivers' reports).
PEER_OPERATIONS = ("append_1", "drain_per_run", "drain_1")


@dataclass
class PeerResult:
    name: str
    version: str = ""
    medians: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # operation (or "*") -> why n/a
    samples: dict[str, list[float]] = field(default_factory=dict)


def short_reason(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    reason = lines[-1] if lines else "failed"
    return reason if len(reason) <= 100 else reason[:97] + "..."


def peer_python(name: str) -> Path:
    """The peer's virtualenv (created, or re-created when its requirements changed); returns
    its python. Raises RuntimeError with pip's last words when it cannot be installed."""
    _, requirements = PEERS[name]
    venv = PEERS_DIR / name
    python = venv / "bin" / "python"
    marker = venv / "bench-requirements.txt"
    wanted = "\n".join(requirements) + "\n"
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    log(f"  installing {name} into {venv} ({', '.join(requirements)})")
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements],
    ]
    for command in steps:
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command[:4])}...: {short_reason(done.stderr)}")
    marker.write_text(wanted)
    return python


def run_peer(name: str, server_url: str, sizes: Sizes, operations: Sequence[str]) -> PeerResult:
    """Install the peer if needed, (re)create its database ``bench_peer_<name>`` and run its
    driver there; whatever fails becomes an "n/a" with the reason, never an exception."""
    import tempfile

    result = PeerResult(name)
    driver, _ = PEERS[name]
    try:
        python = peer_python(name)
        url = recreate_database(server_url, "bench_peer_" + re.sub(r"\W", "_", name))
    except Exception as error:
        result.errors["*"] = short_reason(str(error))
        return result
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        out = Path(tmp) / "report.json"
        command = [
            str(python),
            str(HERE / "peers" / driver),
            *("--database-url", url, "--out", str(out), "--rounds", str(sizes.rounds)),
            *("--enqueue", str(sizes.append_one_events)),
            *("--per-run-runs", str(sizes.per_run_runs)),
            *("--drain-runs", str(sizes.runs), "--drain-per-run", str(sizes.events_per_run)),
            *("--only", ",".join(operations)),
        ]
        try:
            done = subprocess.run(
                command, stdout=sys.stderr, stderr=subprocess.PIPE, text=True, timeout=7200
            )
            failure = f"driver exited {done.returncode}: {short_reason(done.stderr)}"
        except subprocess.TimeoutExpired:
            done, failure = None, "driver timed out"
        report = json.loads(out.read_text()) if out.exists() else {}
    result.version = str(report.get("version", ""))
    for operation in operations:
        measured = report.get("results", {}).get(operation)
        if measured and measured.get("samples"):
            result.samples[operation] = [float(v) for v in measured["samples"]]
            result.medians[operation] = statistics.median(result.samples[operation])
        elif operation in report.get("errors", {}):
            result.errors[operation] = short_reason(report["errors"][operation])
        else:
            result.errors[operation] = failure if done is None or done.returncode else "no result"
    return result


def attach_peers(rows: Sequence[Row], peers: Sequence[PeerResult]) -> None:
    """Each peer's median (or "n/a (why)") on the rows it was measured for; the best one is
    the row's peer."""
    for row in rows:
        if row.name not in PEER_OPERATIONS:
            continue
        for peer in peers:
            label = f"{peer.name} {peer.version}".strip()
            if row.name in peer.medians:
                rate = peer.medians[row.name]
                row.peers[label] = number(rate, row.unit)
                if row.peer is None or rate > row.peer:
                    row.peer, row.peer_name = rate, peer.name
            else:
                why = peer.errors.get(row.name) or peer.errors.get("*", "not run")
                row.peers[label] = f"n/a ({why})"


# --- Main ------------------------------------------------------------------------------------


def environment(url: str) -> dict[str, Any]:
    import django
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return {
        "python": platform.python_version(),
        "django": django.get_version(),
        "psycopg": psycopg.__version__,
        "postgresql": row[0] if row else "?",
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
    }


# A step that loses the server (a shared machine's PostgreSQL restarted by someone else) runs
# again once the server is back, up to this many times in all.
STEP_ATTEMPTS = 3


def connection_lost(error: BaseException) -> bool:
    """Whether ``error`` says the database connection failed or went away."""
    import psycopg
    from django.db import utils

    lost = (psycopg.OperationalError, utils.OperationalError, utils.InterfaceError)
    return isinstance(error, lost) or (
        error.__cause__ is not None and connection_lost(error.__cause__)
    )


def wait_for_server(url: str, timeout: float = 120) -> bool:
    """Poll until the server accepts connections again (True) or ``timeout`` passes."""
    import psycopg

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            psycopg.connect(url, connect_timeout=5).close()
            return True
        except psycopg.OperationalError:
            time.sleep(1)
    return False


def close_django_connections() -> None:
    from django.db import connections

    for connection in connections.all(initialized_only=True):
        try:
            connection.close()
        except Exception:  # already broken: nothing to close cleanly
            connection.connection = None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    server_url = args.database_url or os.environ.get("DATABASE_URL") or DEFAULT_URL
    if args.memory_child:
        memory_child(args.memory_child, server_url, args.memory_rows)
        return 0
    if args.drain_memory_child:
        drain_memory_child(server_url)
        return 0
    if urlsplit(server_url).scheme not in ("postgres", "postgresql", "pgsql"):
        print(f"DATABASE_URL must be PostgreSQL, not {server_url!r}", file=sys.stderr)
        return 2
    sizes = sizes_from(args)
    name = args.database_name or ("bench_runs_app_smoke" if args.smoke else "bench_runs_app")
    selected = args.only or list(BENCHMARKS)
    started = time.perf_counter()
    load_before = load_average()

    url = recreate_database(server_url, name)
    configure_django(url)
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    env = environment(url)
    log(f"database {name}, sizes {sizes}, load average {load_before}")

    bench = Bench(url, sizes)
    steps: dict[str, Callable[[], Row | list[Row]]] = {
        "flush_insert": lambda: bench.flush(update=False),
        "flush_update": lambda: bench.flush(update=True),
        "flush_model_insert": lambda: bench.flush_model(update=False),
        "flush_model_update": lambda: bench.flush_model(update=True),
        "confirm": bench.confirm,
        "cleanup": bench.cleanup,
        "cleanup_soft": bench.cleanup_soft,
        "restore": bench.restore,
        "append_1": lambda: bench.append(1),
        "append_100": lambda: bench.append(100),
        "drain": bench.drain,
        "drain_per_run": bench.drain_per_run,
        "drain_backlog": bench.drain_backlog,
        "drain_unpruned": bench.drain_unpruned,
        "latency": bench.latency,
        "memory": bench.memory,
        "drain_memory": bench.drain_memory,
    }
    rows: list[Row] = []
    failed: list[str] = []
    for step in BENCHMARKS:
        if step not in selected:
            continue
        result: Row | list[Row] | None = None
        for attempt in range(1, STEP_ATTEMPTS + 1):
            log(f"{step} ..." if attempt == 1 else f"{step} again ({attempt}) ...")
            try:
                result = steps[step]()
                break
            except Exception as error:
                # One broken step (or a server restarted by someone else on a shared machine)
                # must not cost the figures of the others; it still fails the run, smoke included.
                log(traceback.format_exc())
                bench.close_conn()
                close_django_connections()
                if attempt < STEP_ATTEMPTS and connection_lost(error) and wait_for_server(url):
                    log("  lost the server (restarted by someone else?): the step runs again")
                    continue
                failed.append(step)
                break
        if result is not None:
            for row in result if isinstance(result, list) else [result]:
                rows.append(row)
                log(f"  {render_table([row]).splitlines()[2]}")
    bench.close_conn()

    peers: list[PeerResult] = []
    if args.peers:
        operations = [name for name in PEER_OPERATIONS if any(row.name == name for row in rows)]
        for peer in PEERS:
            log(f"peer {peer} ...")
            wait_for_server(server_url, 60)
            peers.append(run_peer(peer, server_url, sizes, operations))
            log(f"  {peers[-1]}")
        attach_peers(rows, peers)

    table = render_table(rows, with_peers=args.peers)
    load_after = load_average()
    elapsed = time.perf_counter() - started
    print(table)
    if peers:
        print("\nEvery contender (median of each; a peer's figure is its closest operation):\n")
        print(render_peer_table(rows, [f"{p.name} {p.version}".strip() for p in peers]))
    print(
        f"\nPostgreSQL {env['postgresql']}, Python {env['python']}, Django {env['django']},"
        f" psycopg {env['psycopg']}, {env['cpus']} CPUs; {sizes.rounds} round(s) per side;"
        f" load average {load_before} -> {load_after}; {elapsed:.0f} s"
    )
    busiest = max(float(load.split()[0]) for load in (load_before, load_after))
    if busiest > 0.5 * (os.cpu_count() or 1):
        print(
            "Warning: the machine was busy (1-minute load above half its CPUs): the figures,"
            " commit-bound ones above all, are unreliable; measure again on a quiet machine."
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "environment": env,
                    "sizes": asdict(sizes),
                    "smoke": args.smoke,
                    "load_average": [load_before, load_after],
                    "seconds": elapsed,
                    "results": [row.as_dict() for row in rows],
                    "peers": [asdict(peer) for peer in peers],
                    "errors": failed,
                },
                indent=2,
            )
            + "\n"
        )
    if failed:
        print(f"\nError in: {', '.join(failed)} (traceback on stderr)")
        return 1
    if args.smoke:
        return 0
    return 0 if all(row.status in ("pass", "info") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
