"""``manage.py purge_tombstones``: a thin shell over ``services.purge_tombstones``: delete for
good the rows of a soft-deleting tracked model tombstoned longer ago than the retention, in
batches, audited like a cleanup's deletions.

Exit codes: 0 done (or a dry run), 2 usage error (not a soft-deleting model, no retention).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError, CommandParser

from runs_app import services
from runs_app.exceptions import InvalidInput
from runs_app.management.argtypes import positive_int, positive_seconds, tracked_model
from runs_app.management.base import StrictCommand


class Command(StrictCommand):
    help = (
        "Delete the tombstoned rows of a soft-deleting tracked model older than "
        "--older-than SECONDS (default: RUNS_APP['TOMBSTONE_RETENTION']), in batches, each "
        "audited by <sync_name>.purged events on the run that tombstoned them."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--model",
            type=tracked_model,
            required=True,
            metavar="APP_LABEL.MODEL",
            help="the soft-deleting tracked model",
        )
        parser.add_argument(
            "--older-than",
            type=positive_seconds,
            metavar="SECONDS",
            help="tombstones set longer ago than this (default: TOMBSTONE_RETENTION)",
        )
        parser.add_argument("--batch-size", type=positive_int, metavar="N")
        parser.add_argument("--dry-run", action="store_true", help="count; write nothing")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            result = services.purge_tombstones(
                options["model"],
                options["older_than"],
                dry_run=options["dry_run"],
                batch_size=options["batch_size"],
            )
        except InvalidInput as exc:
            raise CommandError(str(exc), returncode=2) from exc
        verb = "Dry run: would purge" if result.dry_run else "Purged"
        message = (
            f"{verb} {result.purged} tombstoned row(s) of {result.model} "
            f"(tombstoned before {result.cutoff:%Y-%m-%d %H:%M:%S %Z})."
        )
        if result.unattributed:
            message += (
                f" {result.unattributed} expired tombstone(s) were left: the run that set them "
                "was deleted, so their audit has no run to go to."
            )
        self.stdout.write(message)
