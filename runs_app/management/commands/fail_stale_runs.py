"""``manage.py fail_stale_runs``: a thin shell over ``services.fail_stale_runs``."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from runs_app import services

from ..argtypes import positive_seconds
from ..base import StrictCommand


class Command(StrictCommand):
    help = (
        "Mark failed every active run without a heartbeat for RUN_STALE_AFTER seconds "
        "(or --older-than), with a run.failed event of reason 'stale'."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than",
            type=positive_seconds,
            metavar="SECONDS",
            help="staleness threshold in seconds (default: RUNS_APP['RUN_STALE_AFTER'])",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        count = services.fail_stale_runs(options["older_than"])
        self.stdout.write(f"Marked {count} stale run(s) failed.")
