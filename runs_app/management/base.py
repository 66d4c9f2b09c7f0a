"""``StrictCommand``: the base of every management command of runs_app (and of the example
project's), which refuses abbreviated options.

argparse accepts any unambiguous prefix of an option by default, so ``sync_projects --force``
was silently taken as Django's ``--force-color``: the command ran, without what the user asked
for. A ``StrictCommand`` takes options only as spelled in full; anything else is an unknown
option (exit status 2 and a usage message on the command line, ``CommandError`` under
``call_command``).
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser


class StrictCommand(BaseCommand):
    """A ``BaseCommand`` whose parser has ``allow_abbrev=False``: ``--forc`` or ``--force``
    never stands for ``--force-color``, ``--verb`` never for ``--verbosity``."""

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        kwargs.setdefault("allow_abbrev", False)
        return super().create_parser(prog_name, subcommand, **kwargs)
