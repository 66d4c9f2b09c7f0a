"""The README's main job (``manage.py demo``) on the test database."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command

from runs_app.models import CleanupStatus, Project, RunEvent, RunState, RunStatus


@pytest.mark.django_db(transaction=True)
def test_demo_shows_every_guarantee() -> None:
    out = StringIO()
    call_command("demo", stdout=out, stderr=StringIO())

    states = list(RunState.objects.order_by("run__ordinal"))
    assert [state.status for state in states] == [
        RunStatus.COMPLETED,
        RunStatus.COMPLETED,
        RunStatus.FAILED,
    ]
    assert states[1].rows_removed == 5
    assert (states[2].cleanup_status, states[2].cleanup_reason) == (
        CleanupStatus.REFUSED,
        "flush_failed",
    )
    assert Project.objects.filter(scope="example").count() == 495
    assert not RunEvent.objects.pending().exists()
    assert "nothing was lost" in out.getvalue()
