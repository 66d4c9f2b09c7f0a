"""factory-boy factories. Runs are made through the services, so they are always whole
(state, outbox and run.started event), exactly as the app writes them."""

from __future__ import annotations

from typing import Any

import factory
from django.utils import timezone

from runs_app import services
from runs_app.models import CleanupStatus, FlushStatus, Project, Run, RunModelState


class RunFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Run

    scope = factory.Sequence(lambda n: f"scope-{n}")
    id = factory.Sequence(lambda n: f"run-{n}")
    metadata = factory.LazyFunction(dict)

    @classmethod
    def _create(cls, model_class: type[Run], *args: Any, **kwargs: Any) -> Run:
        return services.create_run(
            kwargs["scope"],
            run_id=kwargs["id"],
            metadata=kwargs["metadata"],
            events=kwargs.get("events", ()),
        )


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
