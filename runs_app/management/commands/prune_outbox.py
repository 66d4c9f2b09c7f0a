"""``manage.py prune_outbox --older-than SECONDS``: delete old published outbox events."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandParser

from ...services.outbox import prune_outbox
from ..argtypes import positive_seconds
from ..base import StrictCommand


class Command(StrictCommand):
    help = (
        "Delete outbox events published more than SECONDS ago, in batches. Pending and skipped "
        "events are never deleted."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than",
            type=positive_seconds,
            required=True,
            metavar="SECONDS",
            help="Delete events published more than this many seconds ago.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        deleted = prune_outbox(options["older_than"])
        if options["verbosity"] >= 1:
            self.stdout.write(
                f"prune_outbox: deleted {deleted} published event(s) older than "
                f"{options['older_than']:g} s."
            )
