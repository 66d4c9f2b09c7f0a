"""``manage.py runs_status``: the health of runs and delivery, for people and for monitoring.

Exit codes: 0 healthy (or no threshold given), 1 a threshold is exceeded (strictly greater than
its limit), 2 usage error (bad argument, unknown scope). The facts come from
:mod:`runs_app.inspection`, the same read model the admin shows.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.utils import timezone

from ... import inspection
from ...exceptions import InvalidInput
from ...services.validation import validate_scope
from ..argtypes import non_negative_int, non_negative_seconds
from ..base import StrictCommand

USAGE_ERROR = 2
THRESHOLD_EXCEEDED = 1


def _text(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=False)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [headers, *rows]
    ]


class Command(StrictCommand):
    help = (
        "Show the latest run of each scope and the outbox's delivery state. Exit 1 when a "
        "threshold is exceeded (strictly greater than its limit), 2 on usage errors."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--scope", help="Only this scope.")
        parser.add_argument(
            "--json", action="store_true", help="Print the facts as one JSON object."
        )
        parser.add_argument(
            "--max-lag",
            type=non_negative_seconds,
            metavar="SECONDS",
            help="Exceeded when the oldest pending event is older than SECONDS.",
        )
        parser.add_argument(
            "--max-blocked",
            type=non_negative_int,
            metavar="N",
            help="Exceeded when more than N runs have a blocked outbox.",
        )
        parser.add_argument(
            "--max-stale",
            type=non_negative_int,
            metavar="N",
            help="Exceeded when more than N active runs have no heartbeat for RUN_STALE_AFTER.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        scope = options["scope"]
        if scope is not None:
            try:
                scope = validate_scope(scope)
            except InvalidInput as exc:
                raise CommandError(str(exc), returncode=USAGE_ERROR) from None
        facts = inspection.health(scope, timezone.now())
        if scope is not None and not facts.scopes:
            raise CommandError(f"No run in scope {scope!r}.", returncode=USAGE_ERROR)

        exceeded = self.exceeded(facts, options)
        if options["json"]:
            data = facts.as_json()
            data["thresholds"] = {
                "max_lag": options["max_lag"],
                "max_blocked": options["max_blocked"],
                "max_stale": options["max_stale"],
            }
            data["exceeded"] = exceeded
            data["ok"] = not exceeded
            self.stdout.write(json.dumps(data, indent=2, sort_keys=True))
        else:
            self.stdout.write("\n".join(self.text(facts, exceeded)))
        if exceeded:
            raise CommandError("; ".join(exceeded), returncode=THRESHOLD_EXCEEDED)

    @staticmethod
    def exceeded(facts: inspection.Health, options: dict[str, Any]) -> list[str]:
        """The thresholds exceeded, strictly greater than the limit (at the limit is fine)."""
        found = []
        lag = facts.outbox.oldest_pending_age_seconds
        if options["max_lag"] is not None and lag is not None and lag > options["max_lag"]:
            found.append(f"delivery lag {lag:.0f}s > --max-lag {options['max_lag']:g}s")
        blocked = facts.outbox.blocked_runs
        if options["max_blocked"] is not None and blocked > options["max_blocked"]:
            found.append(f"{blocked} blocked outbox(es) > --max-blocked {options['max_blocked']}")
        if options["max_stale"] is not None and facts.stale_runs > options["max_stale"]:
            found.append(f"{facts.stale_runs} stale run(s) > --max-stale {options['max_stale']}")
        return found

    @staticmethod
    def text(facts: inspection.Health, exceeded: list[str]) -> list[str]:
        headers = [
            "scope",
            "latest run",
            "status",
            "age",
            "flush",
            "seen",
            "created",
            "updated",
            "removed",
            "cleanup",
            "runs",
        ]
        rows = [
            [
                item.scope,
                item.run_id,
                item.status + (" (stale)" if item.stale else ""),
                inspection.format_seconds(item.age_seconds),
                item.flush_status,
                str(item.rows_seen),
                str(item.rows_created),
                str(item.rows_updated),
                str(item.rows_removed),
                item.cleanup_status + (f": {item.cleanup_reason}" if item.cleanup_reason else ""),
                str(item.runs),
            ]
            for item in facts.scopes
        ]
        outbox = facts.outbox
        lines = _table(headers, rows) if rows else ["No runs."]
        per_model = [item for item in facts.scopes if item.models]
        if per_model:
            lines += ["", "per model (latest run of each scope)"]
            model_rows = [
                [
                    item.scope,
                    line.model,
                    line.flush_status,
                    str(line.rows_seen),
                    str(line.rows_created),
                    str(line.rows_updated),
                    str(line.rows_confirmed),
                    str(line.rows_removed),
                    line.cleanup_status
                    + (f": {line.cleanup_reason}" if line.cleanup_reason else ""),
                ]
                for item in per_model
                for line in item.models
            ]
            model_headers = ["scope", "model", "flush", "seen", "created", "updated"]
            model_headers += ["confirmed", "removed", "cleanup"]
            lines += ["  " + text for text in _table(model_headers, model_rows)]
        lines += [
            "",
            "outbox",
            f"  pending events      {outbox.pending_events} in {outbox.runs_with_pending} run(s)",
            "  oldest pending age  "
            + _text(inspection.format_seconds(outbox.oldest_pending_age_seconds)),
            f"  blocked runs        {outbox.blocked_runs}",
            f"  held leases         {outbox.held_leases}",
            f"  stale runs          {facts.stale_runs}",
            "",
            ("EXCEEDED: " + "; ".join(exceeded)) if exceeded else "OK",
        ]
        return lines
