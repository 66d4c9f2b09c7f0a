"""factory-boy factories. Runs are made through the services, so they are always whole
(state, outbox and run.started event), exactly as the app writes them."""

from __future__ import annotations

from typing import Any

import factory

from runs_app import services
from runs_app.models import Project, Run


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
