"""``manage.py drain_outbox``: deliver pending outbox events through the configured publisher."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.db import DatabaseError

from ... import relay
from ...db import db_alias
from ...exceptions import InvalidInput, PublisherError
from ...models import RunOutbox
from ...publishers import close_publisher, load_publisher
from ...services.validation import validate_run_id
from ..argtypes import positive_int, positive_seconds
from ..base import StrictCommand


class Command(StrictCommand):
    help = (
        "Deliver pending outbox events, per run in seq order, through RUNS_APP['PUBLISHER']. "
        "--once: drain until nothing is claimable, then exit (1 if a publish failed). "
        "Otherwise loop until SIGTERM/SIGINT; on PostgreSQL (RUNS_APP NOTIFY) a committed event "
        "wakes the loop at once (LISTEN). Several relays may run at once on PostgreSQL."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--once",
            action="store_true",
            help="Drain until nothing is claimable right now, then exit: 0 if every publish "
            "succeeded, 1 if some failed (their events stay pending).",
        )
        parser.add_argument("--run", dest="run_id", metavar="RUN_ID", help="Only this run.")
        parser.add_argument(
            "--batch-size",
            type=positive_int,
            metavar="N",
            help="Events per publish call and runs per claim (default RUNS_APP DRAIN_BATCH_SIZE).",
        )
        parser.add_argument(
            "--interval",
            type=positive_seconds,
            metavar="SECONDS",
            help="Idle wait between polls in loop mode (default RUNS_APP POLL_INTERVAL); on "
            "PostgreSQL with NOTIFY on, a committed event ends the wait at once.",
        )
        parser.add_argument(
            "--max-messages",
            type=positive_int,
            metavar="N",
            help="Exit after publishing N messages.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        verbosity: int = options["verbosity"]
        run_id = self._run_id(options["run_id"])
        try:
            # Before any claim: a publisher that cannot be built must not lease anything.
            publisher = load_publisher()
        except PublisherError as exc:
            raise CommandError(f"{exc} (see `manage.py check`, runs_app.E021)") from exc
        passes = 0

        def report(result: relay.DrainResult) -> None:
            nonlocal passes
            passes += 1
            if verbosity >= 2:
                failed = f", failed: {', '.join(result.failed_runs)}" if result.failed_runs else ""
                self.stdout.write(
                    f"pass {passes}: {result.runs_touched} run(s), "
                    f"{result.published} message(s) published{failed}"
                )

        try:
            if options["once"]:
                try:
                    total = relay.drain_until_idle(
                        publisher=publisher,
                        batch_size=options["batch_size"],
                        run_id=run_id,
                        max_messages=options["max_messages"],
                        on_pass=report,
                    )
                except DatabaseError as exc:
                    raise CommandError(f"database error: {exc}") from exc
            else:
                with stop_on_signals() as stop:
                    total = relay.run_relay(
                        publisher=publisher,
                        stop=stop,
                        batch_size=options["batch_size"],
                        run_id=run_id,
                        interval=options["interval"],
                        max_messages=options["max_messages"],
                        on_pass=report,
                    )
        finally:
            close_publisher(publisher)
        failures = len(total.failed_runs)
        if verbosity >= 1:
            self.stdout.write(
                f"drain_outbox: {total.published} message(s) published in {passes} pass(es) "
                f"({total.runs_touched} run batch(es)); {failures} failed publish(es)."
            )
        if failures and options["once"]:
            runs = ", ".join(sorted(set(total.failed_runs)))
            raise CommandError(
                f"{failures} publish(es) failed (runs: {runs}); their events stay pending: "
                "a failed publish is retried after a backoff; a blocked run (a gap, or "
                "MAX_ATTEMPTS reached) waits for an operator: runs_status lists it, "
                "skip_outbox_event or the admin's skip moves it on.",
                returncode=1,
            )

    def _run_id(self, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            run_id = validate_run_id(value, "--run")
        except InvalidInput as exc:
            raise CommandError(str(exc), returncode=2) from exc
        if not RunOutbox.objects.using(db_alias()).filter(run_id=run_id).exists():
            raise CommandError(f"--run: no run with id {run_id!r}.", returncode=2)
        return run_id


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM or SIGINT (previous handlers restored on exit). Setting an
    event is all a handler does: the relay finishes the batch in hand, then returns."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
