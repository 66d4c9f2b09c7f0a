"""factory-boy factories. Runs are made through the services, so they are always whole
(state, outbox and run.started event), exactly as the app writes them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import factory
from django.utils import timezone

from runs_app import services
from runs_app.models import CleanupStatus, FlushStatus, Project, Run, RunModelState, RunState
from tests import scenarios


def _nothing(run: Run, create: bool, extracted: Any, **kwargs: Any) -> None:
    """The default of a post-generation step a trait may replace."""


def _append_events(run: Run, create: bool, extracted: int | None, **kwargs: Any) -> None:
    if extracted:
        scenarios.fill_events(run, run.last_seq + extracted)


def _complete(run: Run, create: bool, extracted: Any, **kwargs: Any) -> None:
    """Flushed (120 rows seen: 20 created, 100 updated, all confirmed), then completed."""
    RunState.objects.filter(run=run).update(
        flush_status=FlushStatus.SUCCEEDED,
        flushed_at=timezone.now(),
        rows_seen=120,
        rows_created=20,
        rows_updated=100,
        rows_confirmed=120,
    )
    services.complete_run(run)


def _fail(run: Run, create: bool, extracted: Any, **kwargs: Any) -> None:
    services.fail_run(run, f"job crashed {scenarios.SCRIPT}")


def _fail_flush(run: Run, create: bool, extracted: Any, **kwargs: Any) -> None:
    """The flush failed, so completing failed the run, and the cleanup refused."""
    RunState.objects.filter(run=run).update(
        flush_status=FlushStatus.FAILED,
        flush_error=f"source timed out {scenarios.SCRIPT}",
        rows_seen=40,
    )
    services.complete_run(run)  # fail-safe: becomes "failed" with the flush error
    RunState.objects.filter(run=run).update(
        cleanup_status=CleanupStatus.REFUSED,
        cleanup_reason="flush_failed",
        cleanup_message="The run's flush failed: deleting unseen projects could lose data.",
        cleanup_at=timezone.now(),
    )


def _clean(run: Run, create: bool, extracted: Any, **kwargs: Any) -> None:
    RunState.objects.filter(run=run).update(
        cleanup_status=CleanupStatus.DONE, rows_removed=3, cleanup_at=timezone.now()
    )


def _block(run: Run, create: bool, extracted: Any, **kwargs: Any) -> None:
    scenarios.block_outbox(run)


def _lease(run: Run, create: bool, extracted: Any, **kwargs: Any) -> None:
    scenarios.hold_lease(run)


class RunFactory(factory.django.DjangoModelFactory):
    """A run made by ``services.create_run``, then brought to a state as the services (flush,
    completion, cleanup, relay) would leave it.

    ``events=N``: N more ``project.seen`` events (appended while the run is open).
    Traits: ``completed`` (flush succeeded, 120 rows seen, completed), ``cleaned`` (with
    ``completed``: cleanup done, 3 rows removed), ``failed`` (``fail_run`` with an error),
    ``flush_failed`` (the flush failed, so the run failed, and the cleanup refused),
    ``blocked`` (delivery blocked after 10 attempts, a ``<script>`` in the error), ``leased``
    (a relay holds the delivery lease).
    """

    class Meta:
        model = Run

    scope = factory.Sequence(lambda n: f"scope-{n}")
    id = factory.Sequence(lambda n: f"run-{n}")
    metadata = factory.LazyFunction(dict)

    # Post-generation steps, in this order: events while the run is open, then its end, then
    # what happens after (cleanup, delivery).
    events = factory.PostGeneration(_append_events)
    ending = factory.PostGeneration(_nothing)
    cleanup = factory.PostGeneration(_nothing)
    delivery = factory.PostGeneration(_nothing)
    lease = factory.PostGeneration(_nothing)

    class Params:
        completed = factory.Trait(ending=factory.PostGeneration(_complete))
        failed = factory.Trait(ending=factory.PostGeneration(_fail))
        flush_failed = factory.Trait(ending=factory.PostGeneration(_fail_flush))
        cleaned = factory.Trait(cleanup=factory.PostGeneration(_clean))
        blocked = factory.Trait(delivery=factory.PostGeneration(_block))
        leased = factory.Trait(lease=factory.PostGeneration(_lease))

    @classmethod
    def _create(cls, model_class: type[Run], *args: Any, **kwargs: Any) -> Run:
        return services.create_run(
            kwargs["scope"], run_id=kwargs["id"], metadata=kwargs["metadata"]
        )

    @classmethod
    def _after_postgeneration(cls, instance: Run, create: bool, results: Any = None) -> None:
        # The steps wrote through the services and update(): show the instance what they did.
        instance.refresh_from_db()


class ProjectFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Project

    scope = "default"
    key = factory.Sequence(lambda n: f"project-{n:05d}")
    name = factory.LazyAttribute(lambda project: f"Project {project.key}")
    data = factory.LazyFunction(dict)


class RunModelStateFactory(factory.django.DjangoModelFactory):
    """A run's ledger line for one model, as the flush, completion and cleanup leave it.

    Traits: ``flushed`` (the flush succeeded, counts filled), ``flush_failed``,
    ``cleaned`` (cleanup done, rows removed), ``cleanup_refused``.
    """

    class Meta:
        model = RunModelState

    run = factory.SubFactory(RunFactory)
    model = "runs_app.project"

    class Params:
        flushed = factory.Trait(
            flush_status=FlushStatus.SUCCEEDED,
            rows_seen=factory.LazyAttribute(lambda o: o.rows_created + o.rows_updated),
            rows_created=2,
            rows_updated=3,
        )
        flush_failed = factory.Trait(flush_status=FlushStatus.FAILED)
        cleaned = factory.Trait(
            cleanup_status=CleanupStatus.DONE,
            rows_removed=1,
            cleanup_at=factory.LazyFunction(timezone.now),
        )
        cleanup_refused = factory.Trait(
            cleanup_status=CleanupStatus.REFUSED,
            cleanup_reason="flush_failed",
            cleanup_message="The run's flush failed: deleting unseen rows could lose data.",
            cleanup_at=factory.LazyFunction(timezone.now),
        )


@dataclass
class AdminStory:
    active: Run
    completed: Run
    failed_flush: Run
    blocked: Run
    big: Run


def admin_story() -> AdminStory:
    """One run in each state an operator meets: active; completed and cleaned up (3 rows
    removed); failed flush with a refused cleanup (and a project it saw, a ``<script>`` in its
    name and data); blocked (a ``<script>`` in a payload and in the delivery error); completed
    with 1,000 events and a relay holding its lease."""
    active = RunFactory(scope="alpha", id="run-active")
    completed = RunFactory(scope="beta", id="run-completed", completed=True, cleaned=True)
    failed = RunFactory(scope="gamma", id="run-failed-flush", flush_failed=True)
    blocked = RunFactory(scope="delta", id="run-blocked", blocked=True)
    services.append_events(
        blocked, [{"type": "project.seen", "payload": {"name": scenarios.SCRIPT, "key": "k1"}}]
    )
    big = RunFactory(scope="epsilon", id="run-big", events=998, completed=True, leased=True)
    ProjectFactory(
        scope="gamma",
        key="p-1",
        name=scenarios.SCRIPT,
        data={"html": scenarios.SCRIPT},
        last_seen_run=failed,
    )
    return AdminStory(active, completed, failed, blocked, big)
