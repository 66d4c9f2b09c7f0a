"""``manage.py runs_status``: the health of runs and delivery, for people and for monitoring.

Thresholds (each checked only when given):

- ``--max-lag SECONDS``: the oldest pending event is older;
- ``--max-blocked N``: more than N runs have a blocked outbox;
- ``--max-stale N``: more than N active runs have no heartbeat for RUN_STALE_AFTER;
- ``--max-age SECONDS``: freshness, per scope: its last completed run finished longer ago, or it
  has none;
- ``--max-failed N``: more than N scopes whose latest run failed or whose latest run's cleanup
  was refused.

Exit codes: 0 healthy (no threshold given, or none exceeded), 1 a threshold is exceeded (strictly
greater than its limit), 2 usage error (bad argument, unknown scope). ``--json`` prints the same
facts, the ``thresholds`` given, the ``exceeded`` messages, ``failed_checks`` (the names of the
thresholds exceeded) and, per scope, ``problems`` (the exceeded thresholds it is part of). The
facts come from :mod:`runs_app.inspection`, the same read model the admin shows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.utils import timezone

from ... import inspection
from ...exceptions import CLEANUP_EXPECTED_REFUSALS, InvalidInput
from ...services.validation import validate_scope
from ...statuses import CleanupStatus, FlushMode, RunStatus
from ..argtypes import non_negative_int, non_negative_seconds, positive_seconds
from ..base import StrictCommand

USAGE_ERROR = 2
THRESHOLD_EXCEEDED = 1
THRESHOLDS = ("max_lag", "max_blocked", "max_stale", "max_age", "max_failed")


@dataclass(frozen=True)
class Exceeded:
    """One threshold exceeded: its name (a key of ``THRESHOLDS``), what to tell a person, and the
    scopes it is about (none for the outbox-wide ones)."""

    check: str
    message: str
    scopes: tuple[str, ...] = ()


def _completed_ago(item: inspection.ScopeHealth) -> str:
    age = item.last_completed_age_seconds
    if age is None:
        return "no completed run"
    return f"last completed {inspection.format_seconds(age)} ago"


def _has_failed(item: inspection.ScopeHealth) -> bool:
    """The latest run failed, or its cleanup was refused (but for a refusal that is the design
    working: an incremental run's)."""
    return item.status == RunStatus.FAILED or (
        item.cleanup_status == CleanupStatus.REFUSED
        and item.cleanup_reason not in CLEANUP_EXPECTED_REFUSALS
    )


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
        parser.add_argument(
            "--max-age",
            type=positive_seconds,
            metavar="SECONDS",
            help="Exceeded when a scope's last completed run finished more than SECONDS ago, or "
            "the scope has no completed run.",
        )
        parser.add_argument(
            "--max-failed",
            type=non_negative_int,
            metavar="N",
            help="Exceeded when more than N scopes' latest run failed or had its cleanup refused "
            "(0: any).",
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
        messages = [item.message for item in exceeded]
        if options["json"]:
            data = facts.as_json()
            for scope_data in data["scopes"]:
                scope_data["problems"] = [
                    item.check for item in exceeded if scope_data["scope"] in item.scopes
                ]
            data["thresholds"] = {name: options.get(name) for name in THRESHOLDS}
            data["exceeded"] = messages
            data["failed_checks"] = [item.check for item in exceeded]
            data["ok"] = not exceeded
            self.stdout.write(json.dumps(data, indent=2, sort_keys=True))
        else:
            self.stdout.write("\n".join(self.text(facts, messages)))
        if exceeded:
            raise CommandError("; ".join(messages), returncode=THRESHOLD_EXCEEDED)

    @staticmethod
    def exceeded(facts: inspection.Health, options: dict[str, Any]) -> list[Exceeded]:
        """The thresholds exceeded, strictly greater than the limit (at the limit is fine), in
        ``THRESHOLDS`` order; a threshold absent from ``options`` or None is not checked."""
        limits = {name: options.get(name) for name in THRESHOLDS}
        found = []
        lag = facts.outbox.oldest_pending_age_seconds
        if limits["max_lag"] is not None and lag is not None and lag > limits["max_lag"]:
            found.append(
                Exceeded("max_lag", f"delivery lag {lag:.0f}s > --max-lag {limits['max_lag']:g}s")
            )
        blocked = facts.outbox.blocked_runs
        if limits["max_blocked"] is not None and blocked > limits["max_blocked"]:
            message = f"{blocked} blocked outbox(es) > --max-blocked {limits['max_blocked']}"
            found.append(Exceeded("max_blocked", message))
        if limits["max_stale"] is not None and facts.stale_runs > limits["max_stale"]:
            message = f"{facts.stale_runs} stale run(s) > --max-stale {limits['max_stale']}"
            found.append(Exceeded("max_stale", message))
        if limits["max_age"] is not None:
            old = [
                item
                for item in facts.scopes
                if item.last_completed_age_seconds is None
                or item.last_completed_age_seconds > limits["max_age"]
            ]
            if old:
                described = ", ".join(f"{item.scope} ({_completed_ago(item)})" for item in old)
                message = (
                    f"{len(old)} scope(s) without a completed run within --max-age "
                    f"{limits['max_age']:g}s: {described}"
                )
                found.append(Exceeded("max_age", message, tuple(item.scope for item in old)))
        failed = [item for item in facts.scopes if _has_failed(item)]
        if limits["max_failed"] is not None and len(failed) > limits["max_failed"]:
            described = ", ".join(
                f"{item.scope} (run failed)"
                if item.status == RunStatus.FAILED
                else f"{item.scope} (cleanup refused: {item.cleanup_reason})"
                for item in failed
            )
            message = (
                f"{len(failed)} scope(s) with a failed run or refused cleanup > --max-failed "
                f"{limits['max_failed']}: {described}"
            )
            found.append(Exceeded("max_failed", message, tuple(item.scope for item in failed)))
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
                    line.flush_status
                    + (f" ({line.flush_mode})" if line.flush_mode != FlushMode.FULL else ""),
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
            ("EXCEEDED: " + "; ".join(exceeded)) if exceeded else _ok(facts),
        ]
        return lines


def _ok(facts: inspection.Health) -> str:
    """The last line when no threshold is exceeded: never a bare "OK" over a scope whose latest
    run failed or whose cleanup was refused (the exit code stays 0: that takes --max-failed)."""
    failed = [item.scope for item in facts.scopes if _has_failed(item)]
    if not failed:
        return "OK"
    return (
        f"OK (no threshold exceeded), but {len(failed)} scope(s) whose latest run failed or whose "
        f"cleanup was refused: {', '.join(failed)} (--max-failed 0 exits 1 then)"
    )
