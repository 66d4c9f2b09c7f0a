"""procrastinate (PostgreSQL job queue) as a peer: deferring a job is the append, a worker
fetching and finishing jobs is the drain. Run in procrastinate's own virtualenv by
bench/run.py --peers; see _common.py for the operations and the report.

- append_1: ``task.defer()`` outside any transaction of ours: one autocommit statement
  (``procrastinate_defer_jobs_v1``) per job, so one transaction per message.
- drain: ``App.run_worker(wait=False, concurrency=1)``: fetches one job per statement
  (``procrastinate_fetch_job_v2``, FOR UPDATE SKIP LOCKED), runs the no-op task, finishes it
  (``procrastinate_finish_job_v1``), until no job is left; jobs are kept (delete_jobs="never"),
  as runs_app keeps published events. 100 per run: the run is the job's ``lock``, procrastinate's
  way to run an aggregate's jobs one at a time in order.
"""

from __future__ import annotations

import logging
from importlib.metadata import version

import procrastinate
import psycopg
from _common import Report, Timer, expect, log, parse_args

SEED_CHUNK = 5_000


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.ERROR)
    report = Report("procrastinate", version("procrastinate"), args)
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=args.database_url))

    @app.task(name="bench_event", queue="bench")
    def bench_event(n: int) -> None:  # the no-op "publisher"
        return None

    def sql(statement: str) -> int:
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            row = conn.execute(statement).fetchone()
            return int(row[0]) if row else 0

    with app.open():
        app.schema_manager.apply_schema()

    def reset() -> None:
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(
                "TRUNCATE procrastinate_jobs, procrastinate_events, procrastinate_workers"
                " RESTART IDENTITY CASCADE"
            )
            conn.execute("ANALYZE procrastinate_jobs")
            conn.execute("CHECKPOINT")

    def enqueue() -> float:
        reset()
        with app.open(), Timer() as timer:
            for n in range(args.enqueue):
                bench_event.defer(n=n)
        expect("jobs deferred", sql("SELECT count(*) FROM procrastinate_jobs"), args.enqueue)
        return args.enqueue / timer.seconds

    def drain(runs: int, per_run: int) -> float:
        reset()
        total = runs * per_run
        with app.open():
            # Untimed seeding: batches of jobs, each batch in one statement.
            if per_run == 1:
                for start in range(0, total, SEED_CHUNK):
                    stop = min(total, start + SEED_CHUNK)
                    bench_event.batch_defer(*({"n": n} for n in range(start, stop)))
            else:
                for run in range(runs):
                    deferrer = bench_event.configure(lock=f"run-{run}")
                    deferrer.batch_defer(*({"n": n} for n in range(per_run)))
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute("ANALYZE procrastinate_jobs")
            conn.execute("CHECKPOINT")
        with Timer() as timer:
            app.run_worker(
                queues=["bench"],
                concurrency=1,
                wait=False,
                listen_notify=False,
                install_signal_handlers=False,
                delete_jobs="never",
            )
        expect(
            "jobs succeeded",
            sql("SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"),
            total,
        )
        return total / timer.seconds

    report.measure("append_1", args.rounds, enqueue)
    report.measure(
        "drain_per_run", args.rounds, lambda: drain(args.per_run_runs, 1), "one job each, no lock"
    )
    report.measure(
        "drain_1",
        args.rounds,
        lambda: drain(args.drain_runs, args.drain_per_run),
        "the run is the job's lock (in-order per run)",
    )
    log("done")


if __name__ == "__main__":
    main()
