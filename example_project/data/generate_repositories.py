"""Writes ``repositories.json``, the sample source of ``manage.py sync_repositories``.

    python example_project/data/generate_repositories.py

Deterministic: the same file on every run and Python version (only ``Random.random()``, whose
sequence for a given seed Python guarantees, is used). The shape is a subset of GitHub's REST
API: ``{"owners": [...], "repositories": [...]}``, each list sorted by id, one record a line.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

PATH = Path(__file__).resolve().parent / "repositories.json"
OWNERS = 36
REPOSITORIES = 300
SEED = 11

T = TypeVar("T")

FIRST = ["ada", "bram", "cleo", "dara", "eli", "faye", "gus", "hana", "ivo", "juno", "kai", "lena"]
LAST = ["lind", "moss", "north", "okafor", "park", "quinn", "reyes", "stone", "tanaka", "vega"]
ORGS = ["borealis", "cobalt", "ember", "fjord", "granite", "harbor", "lumen", "meridian", "nimbus"]
SUFFIXES = ["labs", "io", "hq", "dev", "works"]
WORDS = [
    "anchor", "beacon", "cipher", "delta", "forge", "glacier", "harvest", "ledger", "lumen",
    "meadow", "orbit", "pulse", "quartz", "relay", "signal", "summit", "tundra", "willow",
]  # fmt: skip
KINDS = ["cli", "api", "sdk", "docs", "infra", "bot", "ui", "core"]
LANGUAGES = ["Python", "Go", "Rust", "TypeScript", "Java", "Kotlin", "C", "Ruby", None]
EPOCH = datetime(2010, 1, 1, tzinfo=UTC)


def generate() -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(SEED)

    def pick(items: list[T]) -> T:
        return items[int(rng.random() * len(items))]

    def distinct_ids(count: int, low: int, high: int) -> list[int]:
        ids: set[int] = set()
        while len(ids) < count:
            ids.add(low + int(rng.random() * (high - low)))
        return sorted(ids)

    owners: list[dict[str, Any]] = []
    logins: set[str] = set()
    for owner_id in distinct_ids(OWNERS, 1_000, 150_000_000):
        organization = rng.random() < 0.4
        while True:
            if organization:
                login = f"{pick(ORGS)}-{pick(SUFFIXES)}"
            else:
                login = f"{pick(FIRST)}-{pick(LAST)}"
            if login not in logins:
                break
        logins.add(login)
        owners.append(
            {
                "id": owner_id,
                "login": login,
                "type": "Organization" if organization else "User",
                "html_url": f"https://github.com/{login}",
            }
        )

    # A few owners hold most repositories, as on GitHub.
    weights = [rng.random() ** 3 for _ in owners]
    total = sum(weights)

    def pick_owner() -> dict[str, Any]:
        point = rng.random() * total
        for owner, weight in zip(owners, weights, strict=True):
            point -= weight
            if point < 0:
                return owner
        return owners[-1]

    repositories: list[dict[str, Any]] = []
    names: set[tuple[int, str]] = set()
    for repository_id in distinct_ids(REPOSITORIES, 10_000_000, 800_000_000):
        owner = pick_owner()
        while (owner["id"], name := f"{pick(WORDS)}-{pick(KINDS)}") in names:
            pass
        names.add((owner["id"], name))
        created = EPOCH + timedelta(seconds=int(rng.random() * 14 * 365 * 86_400))
        repositories.append(
            {
                "id": repository_id,
                "name": name,
                "full_name": f"{owner['login']}/{name}",
                "html_url": f"https://github.com/{owner['login']}/{name}",
                "owner": {"id": owner["id"], "login": owner["login"]},
                "stargazers_count": max(0, int(10 / (1.0001 - rng.random()) ** 1.3) - 10),
                "archived": rng.random() < 0.08,
                "language": pick(LANGUAGES),
                "created_at": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
        )
    return {"owners": owners, "repositories": repositories}


def render(sample: dict[str, list[dict[str, Any]]]) -> str:
    """One record a line, so that a change to the sample reads as a small diff."""
    parts = []
    for name, records in sample.items():
        lines = ",\n".join(json.dumps(record, ensure_ascii=False) for record in records)
        parts.append(f'"{name}": [\n{lines}\n]')
    return "{\n" + ",\n".join(parts) + "\n}\n"


if __name__ == "__main__":
    PATH.write_text(render(generate()), encoding="utf-8")
    print(f"wrote {PATH}")
