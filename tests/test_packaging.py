"""What the package says about itself agrees with the code: one version (``runs_app.__version__``,
the installed metadata, the changelog), the MIT licence shipped, and the extras a user installs
bringing what their code paths import."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import django

import runs_app

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_installed_version_is_the_package_version() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", runs_app.__version__)
    # pyproject declares no version of its own: setuptools reads runs_app.__version__.
    assert "version" not in PYPROJECT["project"]
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "runs_app.__version__"}
    assert importlib.metadata.version("runs_app") == runs_app.__version__


def test_the_changelog_opens_with_this_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[?(\d+\.\d+\.\d+)\]? - (\d{4}-\d{2}-\d{2})$", changelog, re.M)
    assert releases, "CHANGELOG.md has no '## X.Y.Z - YYYY-MM-DD' section"
    assert releases[0][0] == runs_app.__version__
    versions = [tuple(int(part) for part in version.split(".")) for version, _ in releases]
    assert versions == sorted(versions, reverse=True), "newest release first"


def test_the_mit_licence_is_shipped() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert "runs_app contributors" in text
    assert PYPROJECT["project"]["license"] == "MIT"
    metadata = importlib.metadata.metadata("runs_app")
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert metadata["License-Expression"] == "MIT"


def test_classifiers_name_every_tested_django_and_python() -> None:
    classifiers = set(importlib.metadata.metadata("runs_app").get_all("Classifier") or [])
    for version in ("5.2", "6.0", "6.1"):
        assert f"Framework :: Django :: {version}" in classifiers
    for version in ("3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {version}" in classifiers
    # The Django this suite runs on is one the classifiers name.
    running = ".".join(str(part) for part in django.VERSION[:2])
    assert f"Framework :: Django :: {running}" in classifiers


def test_the_kombu_extra_brings_the_redis_transport() -> None:
    # kombu's own "redis" extra pins what its Redis transport imports (redis, packaging);
    # naming redis alone left a redis:// publisher failing the system check.
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert any(requirement.startswith("kombu[redis]") for requirement in extras["kombu"])
