"""What every peer driver shares: its command line, timing and the JSON report it writes.

Standard library and psycopg only: this module runs inside each peer's own virtualenv.

A driver measures three operations, each the peer's closest equivalent of a runs_app one:

- ``append_1``: enqueue one message per transaction (``--enqueue`` messages), messages/s;
- ``drain_per_run``: dispatch ``--per-run-runs`` messages, one per "run" (peers have no runs:
  one message per aggregate or job), messages/s;
- ``drain_1``: dispatch ``--drain-runs`` x ``--drain-per-run`` messages, ``--drain-per-run``
  per aggregate where the peer can keep an aggregate's messages in order (else the same
  messages without grouping, said in the note), messages/s.

Seeding is untimed and set-based where the peer's API allows; the publisher side is a no-op.
The report (``--out``) is ``{"peer", "version", "results": {op: {"samples", "note"}},
"errors": {op: text}}``; the harness shows an op in ``errors`` as "n/a".
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

OPERATIONS = ("append_1", "drain_per_run", "drain_1")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--enqueue", type=int, required=True)
    parser.add_argument("--per-run-runs", type=int, required=True)
    parser.add_argument("--drain-runs", type=int, required=True)
    parser.add_argument("--drain-per-run", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", default=",".join(OPERATIONS))
    return parser.parse_args()


def log(message: str) -> None:
    print(message, flush=True)


class Report:
    def __init__(self, peer: str, version: str, args: argparse.Namespace) -> None:
        self.args = args
        self.data: dict[str, Any] = {"peer": peer, "version": version, "results": {}, "errors": {}}
        self.write()

    def write(self) -> None:
        self.args.out.write_text(json.dumps(self.data, indent=2) + "\n")

    def measure(self, op: str, rounds: int, once: Callable[[], float], note: str = "") -> None:
        """``once()`` returns a rate; errors are recorded per operation, the others still run."""
        if op not in self.args.only.split(","):
            return
        samples: list[float] = []
        try:
            for index in range(rounds):
                rate = once()
                samples.append(rate)
                log(f"  {self.data['peer']} {op} round {index + 1}: {rate:,.1f}/s")
        except Exception:
            self.data["errors"][op] = traceback.format_exc(limit=8)
            log(self.data["errors"][op])
        if samples:
            self.data["results"][op] = {"samples": samples, "note": note}
        self.write()


class Timer:
    def __enter__(self) -> Timer:
        self.began = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.began


def expect(what: str, actual: int, expected: int) -> None:
    if actual != expected:
        raise AssertionError(f"{what}: {actual}, expected {expected}")
