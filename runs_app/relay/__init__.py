"""The outbox relay: delivers each run's events, at least once and in seq order.

One concept per module:

- :mod:`.claim`: claiming runs (which, in which fair order, with which statement);
- :mod:`.lease`: the lease protocol after the claim (keep alive while publishing, renew,
  release, acknowledge, record a failure or a gap);
- :mod:`.read`: reading the claimed runs' pending events as messages;
- :mod:`.drain`: one pass (claim, read, publish, acknowledge) and ``DrainResult``;
- :mod:`.loop`: the relay loop and its process life (``run_relay``, ``drain_until_idle``);
- :mod:`.listener`: the LISTEN side of NOTIFY, the loop's idle wait on PostgreSQL.

The relay is built on :mod:`runs_app.services` (the operator services ``retry_outbox``,
``skip_outbox_event`` and ``prune_outbox`` live there, in :mod:`runs_app.services.outbox`); the
services never import the relay. Nothing here runs in the background on its own: draining is
always an explicit call (the one thread a pass starts, the lease keeper of :mod:`.lease`, only
renews the leases of passes under way, and is idle between them).
"""

from __future__ import annotations

from ..services.outbox import prune_outbox, retry_outbox, skip_outbox_event
from .claim import claim_runs
from .drain import DrainResult, drain_outbox_for_run, drain_outbox_once
from .lease import (
    Claim,
    ClaimedRun,
    acknowledge,
    acknowledge_batches,
    backoff_seconds,
    record_failure,
    release_leases,
    renew_leases,
)
from .loop import drain_until_idle, run_relay, wait_for_work
from .read import read_claimed, read_pending

__all__ = [
    "Claim",
    "ClaimedRun",
    "DrainResult",
    "acknowledge",
    "acknowledge_batches",
    "backoff_seconds",
    "claim_runs",
    "drain_outbox_for_run",
    "drain_outbox_once",
    "drain_until_idle",
    "prune_outbox",  # re-exported for compatibility: a service (runs_app.services.outbox)
    "read_claimed",
    "read_pending",
    "record_failure",
    "release_leases",
    "renew_leases",
    "retry_outbox",  # idem
    "run_relay",
    "skip_outbox_event",  # idem
    "wait_for_work",
]
