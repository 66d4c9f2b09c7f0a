"""Every command of runs_app and of the example project refuses abbreviated options
(``StrictCommand``): ``sync_projects --force`` is an error, not ``--force-color``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django.core.management import get_commands, load_command_class
from django.core.management.base import BaseCommand, CommandError

from runs_app.management.base import StrictCommand
from tests.helpers import shell_parser
from tests.relay_helpers import ROOT

OUR_APPS = ("runs_app", "example_project")
COMMANDS = sorted(name for name, app in get_commands().items() if app in OUR_APPS)
# Required options, given so that the unknown one is what argparse reports.
REQUIRED = {
    "prune_outbox": ["--older-than", "60"],
    "purge_tombstones": ["--model", "runs_app.Project"],
    "restore_cleanup": ["--run", "r1"],
}


def command(name: str) -> BaseCommand:
    return load_command_class(get_commands()[name], name)


def abbreviations(name: str) -> list[str]:
    """``--force`` and, for each long option of the command, its name less the last letter,
    when that is not itself an option (``--verbosit``, ``--force-colo``, ``--dry-ru``)."""
    parser = command(name).create_parser("manage.py", name)
    options = {text for action in parser._actions for text in action.option_strings}
    candidates = ["--force", *(text[:-1] for text in sorted(options) if text.startswith("--"))]
    return [text for text in dict.fromkeys(candidates) if text not in options]


def test_the_commands_are_found() -> None:
    assert {"runs_status", "drain_outbox", "cleanup_old_projects", "sync_projects", "demo"} <= set(
        COMMANDS
    )


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_is_strict(name: str) -> None:
    assert isinstance(command(name), StrictCommand)


@pytest.mark.parametrize("name", COMMANDS)
def test_abbreviated_options_exit_2_with_a_message(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    refused = abbreviations(name)
    assert "--verbosit" in refused and "--force-colo" in refused
    if name != "cleanup_old_projects":  # it has a --force of its own
        assert "--force" in refused
    for option in refused:
        parser = shell_parser(command(name), name)
        with pytest.raises(SystemExit) as exited:
            parser.parse_args([option, *REQUIRED.get(name, [])])
        assert exited.value.code == 2, option
        assert f"unrecognized arguments: {option}" in capsys.readouterr().err, option


def test_call_command_raises_command_error_on_an_abbreviation() -> None:
    from django.core.management import call_command

    with pytest.raises(CommandError, match="unrecognized arguments: --max-la 5"):
        call_command("runs_status", "--max-la", "5")


def test_sync_projects_force_in_a_real_process() -> None:
    """The case that was reported: ``--force`` ran the sync with colours forced."""
    done = subprocess.run(
        [sys.executable, "manage.py", "sync_projects", "--force"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "unrecognized arguments: --force" in done.stderr
    assert "Traceback" not in done.stderr
