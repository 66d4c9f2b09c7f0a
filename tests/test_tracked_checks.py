"""The checks of a tracked model's declaration, one test per id (runs_app.E030 to E036), and
the declarations they accept."""

from __future__ import annotations

from typing import Any

import pytest
from django.core import checks
from django.db import models
from django.test.utils import isolate_apps

from runs_app.models import Project, SoftDeleteTrackedModel, TrackedModel
from runs_app.tracking import sync_spec
from tests.tracked_app.models import Asset, Device, Membership, Site


def tracked_messages(model: type[models.Model]) -> list[checks.CheckMessage]:
    return [m for m in model.check() if (m.id or "").startswith("runs_app.")]


def assert_ids(model: type[models.Model], *expected: str) -> list[checks.CheckMessage]:
    messages = tracked_messages(model)
    assert [m.id for m in messages] == list(expected), [str(m) for m in messages]
    assert all(m.hint for m in messages)
    return messages


def declare(body: dict[str, Any], meta: dict[str, Any] | None = None) -> type[models.Model]:
    """A tracked model class of the isolated test app, built from ``body``."""
    attrs: dict[str, Any] = {"__module__": __name__, **body}
    attrs["Meta"] = type("Meta", (), {"app_label": "tracked_app", **(meta or {})})
    return type("Thing", (TrackedModel,), attrs)


@pytest.mark.parametrize("model", [Project, Device, Membership, Site])
def test_the_shipped_declarations_pass(model: type[models.Model]) -> None:
    assert_ids(model)


@isolate_apps("tests.tracked_app")
@pytest.mark.parametrize(
    ("body", "wanted"),
    [
        pytest.param({"sync_key": ()}, "sync_key must be", id="no-key"),
        pytest.param({"sync_key": "code"}, "sync_key must be", id="a-string"),
        pytest.param({"sync_key": ("nope",)}, "'nope'", id="unknown-field"),
        pytest.param({"sync_key": ("code",), "sync_fields": ("nope",)}, "'nope'", id="fields"),
        pytest.param({"sync_key": ("id",)}, "'id'", id="automatic-pk"),
    ],
)
def test_e030_key_or_fields_that_do_not_exist(body: dict[str, Any], wanted: str) -> None:
    model = declare({"code": models.CharField(max_length=10, unique=True), **body})
    (message,) = assert_ids(model, "runs_app.E030")
    assert wanted in message.msg


@isolate_apps("tests.tracked_app")
def test_e031_a_key_without_its_unique_constraint() -> None:
    model = declare({"code": models.CharField(max_length=10), "sync_key": ("code",)})
    assert_ids(model, "runs_app.E031")


@isolate_apps("tests.tracked_app")
def test_e031_the_constraint_must_cover_the_scope_field_too() -> None:
    model = declare(
        {
            "code": models.CharField(max_length=10, unique=True),
            "org": models.CharField(max_length=10),
            "sync_key": ("code",),
            "sync_scope": "org",
        }
    )
    (message,) = assert_ids(model, "runs_app.E031")
    assert "code, org" in message.msg


@isolate_apps("tests.tracked_app")
def test_a_key_covered_by_unique_together_or_a_constraint_passes() -> None:
    fields = {"a": models.IntegerField(), "b": models.IntegerField(), "sync_key": ("a", "b")}
    assert_ids(declare(fields, {"unique_together": [("b", "a")]}))


@isolate_apps("tests.tracked_app")
@pytest.mark.parametrize(
    ("scope", "extra"),
    [
        pytest.param("nope", {}, id="unknown-field"),
        pytest.param("size", {}, id="not-text"),
        pytest.param("code", {}, id="in-the-key"),
        pytest.param("org", {"sync_fields": ("org",)}, id="in-sync-fields"),
        pytest.param(5, {}, id="not-a-name"),
    ],
)
def test_e032_a_bad_scope_declaration(scope: Any, extra: dict[str, Any]) -> None:
    model = declare(
        {
            "code": models.CharField(max_length=10),
            "org": models.CharField(max_length=10),
            "size": models.IntegerField(),
            "sync_key": ("code",),
            "sync_scope": scope,
            **extra,
        },
        {"unique_together": [("code", "org")]},
    )
    assert "runs_app.E032" in [m.id for m in tracked_messages(model)]
    assert "runs_app.E031" not in [m.id for m in tracked_messages(model)]


@isolate_apps("tests.tracked_app")
@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"updated_at": models.CharField(max_length=10)}, id="field-over-a-stamp"),
        pytest.param({"last_seen_run": models.IntegerField(null=True)}, id="run-stamp"),
        pytest.param({"sync_fields": ("code", "created_at")}, id="stamp-in-sync-fields"),
    ],
)
def test_e033_a_field_clashing_with_a_stamp(body: dict[str, Any]) -> None:
    model = declare(
        {"code": models.CharField(max_length=10, unique=True), "sync_key": ("code",), **body}
    )
    assert "runs_app.E033" in [m.id for m in tracked_messages(model)]


@isolate_apps("tests.tracked_app")
def test_e034_a_field_the_source_does_not_own_needs_a_default() -> None:
    body = {
        "code": models.CharField(max_length=10, unique=True),
        "name": models.CharField(max_length=10),
        "local": models.IntegerField(),
        "sync_key": ("code",),
        "sync_fields": ("name",),
    }
    (message,) = assert_ids(declare(body), "runs_app.E034")
    assert "local" in message.msg


@isolate_apps("tests.tracked_app")
def test_a_field_the_source_does_not_own_with_a_default_passes() -> None:
    body = {
        "code": models.CharField(max_length=10, unique=True),
        "local": models.IntegerField(default=0),
        "sync_key": ("code",),
        "sync_fields": (),
    }
    assert_ids(declare(body))


def test_the_resolved_declaration() -> None:
    spec = sync_spec(Device)
    assert spec.label == "tracked_app.device" and spec.rows_name == "rows"
    assert [f.name for f in spec.key] == ["uid"] and spec.scope is not None
    assert spec.scope.name == "tenant"
    assert [f.name for f in spec.owned][:2] == ["uid", "name"]
    assert {f.name for f in spec.defaulted} == {"note", "token"}
    assert sync_spec(Project).event_prefix == "projects"


# -- reversible cleanup: E035 (sync_cleanup), E036 (sync_grace_runs) -----------------------------


def declare_soft(body: dict[str, Any]) -> type[models.Model]:
    attrs: dict[str, Any] = {"__module__": __name__, **body}
    attrs["Meta"] = type("Meta", (), {"app_label": "tracked_app"})
    return type("SoftThing", (SoftDeleteTrackedModel,), attrs)


def test_the_shipped_soft_declaration_passes() -> None:
    assert_ids(Asset)
    spec = sync_spec(Asset)
    assert spec.soft and {field.name for field in spec.owned}.isdisjoint(
        {"deleted_at", "deleted_by_run", "deleted_reason"}
    )


@isolate_apps("tests.tracked_app")
@pytest.mark.parametrize(
    ("base", "mode", "wanted"),
    [
        pytest.param(TrackedModel, "soft", "no tombstone fields", id="soft-without-tombstone"),
        pytest.param(TrackedModel, "hard", "must be 'delete' or 'soft'", id="unknown-mode"),
        pytest.param(SoftDeleteTrackedModel, None, "must be 'delete' or 'soft'", id="none"),
    ],
)
def test_e035_a_cleanup_mode_the_model_cannot_honour(
    base: type[models.Model], mode: Any, wanted: str
) -> None:
    body = {"code": models.CharField(max_length=10, unique=True), "sync_key": ("code",)}
    if base is TrackedModel:
        model = declare({**body, "sync_cleanup": mode})
    else:
        model = declare_soft({**body, "sync_cleanup": mode})
    (message,) = assert_ids(model, "runs_app.E035")
    assert wanted in message.msg


@isolate_apps("tests.tracked_app")
@pytest.mark.parametrize("grace", [0, -1, 1.5, "2", True, 1001])
def test_e036_a_grace_period_out_of_range(grace: Any) -> None:
    model = declare(
        {
            "code": models.CharField(max_length=10, unique=True),
            "sync_key": ("code",),
            "sync_grace_runs": grace,
        }
    )
    (message,) = assert_ids(model, "runs_app.E036")
    assert "sync_grace_runs must be None or an integer from 1 to 1000" in message.msg


@isolate_apps("tests.tracked_app")
@pytest.mark.parametrize("grace", [None, 1, 7, 1000])
def test_a_grace_period_in_range_passes(grace: Any) -> None:
    model = declare(
        {
            "code": models.CharField(max_length=10, unique=True),
            "sync_key": ("code",),
            "sync_grace_runs": grace,
        }
    )
    assert_ids(model)
    assert sync_spec(model).grace_runs == grace
