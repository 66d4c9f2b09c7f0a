"""``manage.py runs_metrics``: the database facts of :mod:`runs_app.metrics` in Prometheus' text
format, for a cron-style relay with no process to scrape (node_exporter's textfile collector, a
push gateway). Exit codes: 0 written, 1 ``prometheus-client`` missing, 2 usage error.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from django.core.management.base import CommandError, CommandParser

from ...metrics import prometheus_text
from ..base import StrictCommand

USAGE_ERROR = 2


class Command(StrictCommand):
    help = (
        "Print the runs and outbox metrics in Prometheus' text format (pending events, oldest "
        "pending age, blocked runs, held leases, runs by status, rows, cleanup refusals). "
        "--output FILE writes them atomically instead (node_exporter's textfile collector)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--output",
            metavar="FILE",
            help="Write to FILE (through a temporary file in its directory, then renamed, so "
            "a collector never reads half a file); its directory must exist.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        output = options["output"]
        target = None if output is None else Path(output)
        if target is not None and not target.parent.is_dir():
            raise CommandError(
                f"--output: directory {str(target.parent)!r} does not exist",
                returncode=USAGE_ERROR,
            )
        if target is not None and target.is_dir():
            raise CommandError(f"--output: {output!r} is a directory", returncode=USAGE_ERROR)
        try:
            body, _content_type = prometheus_text()
        except ImportError as exc:
            raise CommandError(str(exc), returncode=1) from exc
        if target is None:
            self.stdout.write(body.decode("utf-8"), ending="")
            return
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(body)
            os.chmod(temporary, 0o644)  # mkstemp makes 0600; a collector often runs as another user
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
