"""Bad input is refused before anything is written: the right error, the field, the limit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import MappingProxyType
from typing import Any

import pytest
from django.test import override_settings

from runs_app import services
from runs_app.exceptions import InvalidEvent, InvalidInput, RunNotFound, RunsError
from runs_app.models import Project, Run, RunEvent
from runs_app.services import Event
from runs_app.services.rows import RowSchema
from runs_app.services.validation import JSON_MAX_DEPTH
from runs_app.tracking import sync_spec
from tests.factories import RunFactory
from tests.helpers import snapshot

pytestmark = pytest.mark.django_db

GOOD_EVENT = {"type": "ok", "payload": {"n": 1}}


@pytest.fixture
def run() -> Run:
    return RunFactory.create(scope="validation", id="existing-run")


@pytest.fixture
def unchanged() -> Iterator[None]:
    """Asserts that the test body wrote nothing to the five tables."""
    before = snapshot()
    yield
    assert snapshot() == before


def refused(
    action: Callable[[], Any],
    field: str,
    *,
    error: type[InvalidInput] = InvalidInput,
    limit: Any = None,
) -> InvalidInput:
    """Run ``action``; assert it raises exactly ``error`` for ``field`` and writes nothing."""
    before = snapshot()
    with pytest.raises(InvalidInput) as info:
        action()
    exc = info.value
    assert type(exc) is error, f"{type(exc).__name__} instead of {error.__name__}: {exc}"
    assert isinstance(exc, ValueError)
    assert isinstance(exc, RunsError)
    assert exc.field == field, exc
    if limit is not None:
        assert exc.limit == limit, exc
    assert str(exc).startswith(f"{field}: ")
    assert snapshot() == before, "bad input wrote something"
    return exc


# --- events: type and payload, through every path that takes events ----------------------------

# (bad event, field suffix after "events[1]", limit or None)
BAD_EVENTS: list[tuple[str, Any, str, Any]] = [
    ("missing type", {"payload": {}}, ".type", 100),
    ("type None", {"type": None}, ".type", None),
    ("type int", {"type": 5}, ".type", None),
    ("type bytes", {"type": b"x"}, ".type", None),
    ("empty type", {"type": ""}, ".type", 100),
    ("type 101 chars", {"type": "t" * 101}, ".type", 100),
    ("NUL in type", {"type": "a\x00b"}, ".type", None),
    ("dataclass with bad type", Event(""), ".type", 100),
    ("payload list", {"type": "t", "payload": [1, 2]}, ".payload", None),
    ("payload str", {"type": "t", "payload": '{"a": 1}'}, ".payload", None),
    ("payload int", {"type": "t", "payload": 1}, ".payload", None),
    ("payload set", {"type": "t", "payload": {"a": {1, 2}}}, ".payload", None),
    ("payload object", {"type": "t", "payload": {"a": object()}}, ".payload", None),
    ("payload bytes", {"type": "t", "payload": {"a": b"x"}}, ".payload", None),
    ("payload NaN", {"type": "t", "payload": {"a": float("nan")}}, ".payload", None),
    ("payload Infinity", {"type": "t", "payload": {"a": float("inf")}}, ".payload", None),
    ("payload -Infinity", {"type": "t", "payload": {"a": [float("-inf")]}}, ".payload", None),
    ("NUL in value", {"type": "t", "payload": {"a": "x\x00y"}}, ".payload", "no NUL"),
    ("NUL in nested value", {"type": "t", "payload": {"a": [{"b": "\x00"}]}}, ".payload", None),
    ("NUL in key", {"type": "t", "payload": {"a\x00": 1}}, ".payload", "no NUL"),
    ("int key", {"type": "t", "payload": {1: "a"}}, ".payload", None),
    ("nested tuple key", {"type": "t", "payload": {"a": {(1, 2): "a"}}}, ".payload", None),
    ("lone surrogate", {"type": "t", "payload": {"a": "\ud800"}}, ".payload", None),
    ("lone surrogate key", {"type": "t", "payload": {"\udfff": 1}}, ".payload", None),
    ("dataclass bad payload", Event("t", {"a": float("nan")}), ".payload", None),
    ("unknown key", {"type": "t", "payload": {}, "extra": 1}, "", None),
    ("not a mapping", ["t", {}], "", None),
    ("a bare string", "run.thing", "", None),
]


def event_paths(run_id: str) -> dict[str, Callable[[list[Any]], Any]]:
    """Every service that accepts events, taking a list of two events."""
    return {
        "create_run": lambda events: services.create_run("other", events=events),
        "append_events": lambda events: services.append_events(run_id, events),
    }


@pytest.mark.parametrize("path", ["create_run", "append_events"])
@pytest.mark.parametrize(
    ("bad", "suffix", "limit"),
    [pytest.param(bad, suffix, limit, id=name) for name, bad, suffix, limit in BAD_EVENTS],
)
def test_bad_event_refused(run: Run, path: str, bad: Any, suffix: str, limit: Any) -> None:
    # The bad event is the second one: the error names its index, the first is not written.
    action = event_paths(run.id)[path]
    refused(
        lambda: action([GOOD_EVENT, bad]), f"events[1]{suffix}", error=InvalidEvent, limit=limit
    )


def test_event_type_of_100_characters_is_accepted(run: Run) -> None:
    (event,) = services.append_events(run, [{"type": "t" * 100}])
    assert event.type == "t" * 100
    created = services.create_run("other", events=[Event("u" * 100)])
    assert services.list_events(created)[-1].type == "u" * 100


@pytest.mark.parametrize("events", [GOOD_EVENT, Event("t"), "abc", b"abc"])
def test_a_single_event_instead_of_a_list_is_refused(run: Run, events: Any) -> None:
    refused(lambda: services.append_events(run, events), "events", error=InvalidEvent)
    refused(lambda: services.create_run("other", events=events), "events", error=InvalidEvent)


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_json_nesting_limit(run: Run) -> None:
    services.append_events(run, [{"type": "t", "payload": nested(JSON_MAX_DEPTH)}])
    for depth in (JSON_MAX_DEPTH + 1, 100_000):
        refused(
            lambda depth=depth: services.append_events(  # type: ignore[misc]
                run, [{"type": "t", "payload": nested(depth)}]
            ),
            "events[0].payload",
            error=InvalidEvent,
            limit=JSON_MAX_DEPTH,
        )


def test_huge_integer_is_refused_cleanly(run: Run) -> None:
    # Python refuses to turn ints of more than 4300 digits into text (a plain ValueError).
    refused(
        lambda: services.append_events(run, [{"type": "t", "payload": {"n": 10**5000}}]),
        "events[0].payload",
        error=InvalidEvent,
    )


def test_any_mapping_is_accepted_and_stored_as_plain_json(run: Run) -> None:
    payload = MappingProxyType({"a": MappingProxyType({"b": (1, 2)}), "c": [True, None, 1.5]})
    events = services.append_events(run, [Event("t", payload), {"type": "u", "payload": None}])
    stored = {event.type: event.payload for event in services.list_events(run, after_seq=1)}
    assert stored == {"t": {"a": {"b": [1, 2]}, "c": [True, None, 1.5]}, "u": {}}
    assert [event.payload for event in events] == [stored["t"], {}]
    created = services.create_run("other", metadata=MappingProxyType({"m": (1,)}))
    created.refresh_from_db()
    assert created.metadata == {"m": [1]}


def nested_lists(depth: int) -> list[Any]:
    """Lists holding lists: with a dict around it, a scalar ``depth + 1`` levels down."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


# Validation encodes in C first and walks the value only when that cannot prove it valid: these
# are values where the encoding alone would be wrong (json turns 1, 1.5, True and None keys into
# strings, escapes NUL as text, and nests as deep as the stack allows).
FAST_PATH_TRAPS: list[tuple[str, dict[Any, Any], Any]] = [
    ("bool key", {True: 1}, None),
    ("None key in a list", {"a": [1, {None: 1}]}, None),
    ("float key in nested lists", {"a": [[{1.5: "x"}]]}, None),
    ("int key beside its string", {"1": 1, 1: 2}, None),
    ("NUL key in a list", {"a": [{"k\x00": 1}]}, "no NUL"),
    ("NUL after a backslash", {"a": "\\\x00"}, "no NUL"),
    ("NUL key in a tuple", {"a": ({"\x00": 1},)}, "no NUL"),
    ("too deep in lists", {"a": nested_lists(JSON_MAX_DEPTH)}, JSON_MAX_DEPTH),
]


@pytest.mark.parametrize(
    ("payload", "limit"),
    [pytest.param(payload, limit, id=name) for name, payload, limit in FAST_PATH_TRAPS],
)
def test_values_json_would_encode_are_still_refused(run: Run, payload: Any, limit: Any) -> None:
    refused(
        lambda: services.append_events(run, [{"type": "t", "payload": payload}]),
        "events[0].payload",
        error=InvalidEvent,
        limit=limit,
    )
    # The flush's own validation (flush_projects records the failure on the ledger, see
    # test_flush.test_bad_input_fails_the_flush_and_writes_nothing_of_its_batch).
    with pytest.raises(InvalidInput) as info:
        RowSchema(sync_spec(Project), "default", "run").prepare(
            {"key": "k", "name": "n", "data": payload}, 0
        )
    assert (info.value.field, info.value.limit) == ("projects[0].data", limit)


def test_text_that_only_looks_like_nul_or_nesting_is_accepted(run: Run) -> None:
    # A backslash then "u0000" (encoded \\u0000), and brackets inside strings.
    payload = {"a": "\\u0000", "b\\u0000": "[" * 300, "c": "{" * 300, "d": [[["x"]]]}
    (event,) = services.append_events(run, [{"type": "t", "payload": payload}])
    event.refresh_from_db()
    assert event.payload == payload
    assert services.flush_projects(run, [{"key": "k", "name": "n", "data": payload}]).created == 1
    assert Project.objects.get(key="k").data == payload


def test_the_returned_payload_is_a_copy(run: Run) -> None:
    payload: dict[str, Any] = {"a": [1, {"b": 2}]}
    (event,) = services.append_events(run, [Event("t", payload)])
    payload["a"][1]["b"] = 3
    assert event.payload == {"a": [1, {"b": 2}]}


# --- payload size: bytes of compact UTF-8 JSON -------------------------------------------------

LIMIT = 20
# Compact JSON of {"k": "é" * 6} is {"k":"éééééé"}: 14 characters, 20 bytes (é is 2 bytes).
AT_LIMIT = {"k": "é" * 6}
ONE_BYTE_OVER = {"k": "é" * 6 + "a"}


@override_settings(RUNS_APP={"MAX_PAYLOAD_BYTES": LIMIT})
def test_payload_exactly_at_the_limit_is_accepted(run: Run) -> None:
    (event,) = services.append_events(run, [{"type": "t", "payload": AT_LIMIT}])
    event.refresh_from_db()
    assert event.payload == AT_LIMIT
    created = services.create_run("other", metadata=AT_LIMIT, events=[Event("t", AT_LIMIT)])
    assert created.metadata == AT_LIMIT
    # run.started carries the metadata as its payload: at the limit too, never over it.
    assert created.events.get(seq=1).payload == AT_LIMIT


@override_settings(RUNS_APP={"MAX_PAYLOAD_BYTES": LIMIT})
def test_payload_one_byte_over_the_limit_is_refused(run: Run) -> None:
    # 15 characters: only counting UTF-8 bytes (21) finds it too big.
    exc = refused(
        lambda: services.append_events(run, [GOOD_EVENT, Event("t", ONE_BYTE_OVER)]),
        "events[1].payload",
        error=InvalidEvent,
        limit=LIMIT,
    )
    assert "21 bytes" in str(exc)
    refused(
        lambda: services.create_run("other", events=[{"type": "t", "payload": ONE_BYTE_OVER}]),
        "events[0].payload",
        error=InvalidEvent,
        limit=LIMIT,
    )
    refused(
        lambda: services.create_run("other", metadata=ONE_BYTE_OVER),
        "metadata",
        limit=LIMIT,
    )
    refused(lambda: services.ensure_run("new-run", metadata=ONE_BYTE_OVER), "metadata", limit=LIMIT)


def test_payload_limit_follows_the_setting(run: Run) -> None:
    payload = {"k": "x" * 100}
    services.append_events(run, [Event("t", payload)])
    with override_settings(RUNS_APP={"MAX_PAYLOAD_BYTES": 50}):
        refused(
            lambda: services.append_events(run, [Event("t", payload)]),
            "events[0].payload",
            error=InvalidEvent,
            limit=50,
        )


# --- run ids and scopes ------------------------------------------------------------------------

BAD_RUN_IDS: list[tuple[str, Any, Any]] = [
    ("empty", "", 64),
    ("65 chars", "r" * 65, 64),
    ("space", "a b", None),
    ("leading space", " ab", None),
    ("tab", "a\tb", None),
    ("newline", "ab\n", None),
    ("NUL", "a\x00b", None),
    ("control", "a\x01b", None),
    ("DEL", "a\x7fb", None),
    ("unicode space", "a\u00a0b", None),
    ("int", 12, None),
    ("None in ensure_run", None, None),
]


@pytest.mark.parametrize(
    ("bad", "limit"), [pytest.param(bad, limit, id=name) for name, bad, limit in BAD_RUN_IDS]
)
def test_bad_run_id_refused(run: Run, bad: Any, limit: Any) -> None:
    if bad is not None:  # None means "make one up" for create_run
        refused(lambda: services.create_run("other", run_id=bad), "run_id", limit=limit)
    refused(lambda: services.ensure_run(bad, scope="other"), "run_id", limit=limit)
    refused(lambda: services.get_run(bad), "run_id", limit=limit)
    # Services taking "a Run or its id" name the argument "run".
    refused(lambda: services.append_events(bad, [GOOD_EVENT]), "run", limit=limit)
    refused(lambda: services.complete_run(bad), "run", limit=limit)
    refused(lambda: services.fail_run(bad, "x"), "run", limit=limit)
    refused(lambda: services.heartbeat(bad), "run", limit=limit)
    refused(lambda: services.list_events(bad), "run", limit=limit)


def test_run_id_of_64_characters_is_accepted() -> None:
    run_id = "r" * 64
    run = services.create_run("a", run_id=run_id)
    assert services.get_run(run_id) == run
    services.append_events(run_id, [GOOD_EVENT])
    assert services.ensure_run("s" * 64, scope="b")[1] is True


BAD_SCOPES: list[tuple[str, Any, Any]] = [
    ("empty", "", 200),
    ("201 chars", "s" * 201, 200),
    ("int", 3, None),
    ("None", None, None),
    ("control", "a\x01", None),
    ("NUL", "a\x00", None),
    ("leading space", " a", None),
    ("trailing newline", "a\n", None),
]


@pytest.mark.parametrize(
    ("bad", "limit"), [pytest.param(bad, limit, id=name) for name, bad, limit in BAD_SCOPES]
)
def test_bad_scope_refused(bad: Any, limit: Any) -> None:
    refused(lambda: services.create_run(bad), "scope", limit=limit)
    refused(lambda: services.ensure_run("fresh-run", scope=bad), "scope", limit=limit)


def test_scope_of_200_characters_is_accepted() -> None:
    run = services.create_run("s" * 200)
    assert run.state.scope == "s" * 200
    assert services.ensure_run("x", scope="t" * 200)[1] is True


@pytest.mark.parametrize(
    "metadata",
    [[], "x", 1, {"a": {1, 2}}, {"a": float("nan")}, {"a": "\x00"}, {2: "a"}],
    ids=["list", "str", "int", "set", "NaN", "NUL", "int key"],
)
def test_bad_metadata_refused(metadata: Any) -> None:
    refused(lambda: services.create_run("a", metadata=metadata), "metadata")
    refused(lambda: services.ensure_run("fresh-run", metadata=metadata), "metadata")


def test_bad_error_text_refused(run: Run) -> None:
    refused(lambda: services.fail_run(run, error=42), "error")  # type: ignore[arg-type]
    assert run.state.status == "active"


# --- unknown runs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "action",
    [
        lambda: services.append_events("no-such-run", [GOOD_EVENT]),
        lambda: services.append_events("no-such-run", []),
        lambda: services.complete_run("no-such-run"),
        lambda: services.fail_run("no-such-run", "boom"),
        lambda: services.heartbeat("no-such-run"),
        lambda: services.get_run("no-such-run"),
        lambda: services.list_events("no-such-run"),
        lambda: services.list_events("no-such-run", after_seq=5),
    ],
    ids=[
        "append_events",
        "append_no_events",
        "complete_run",
        "fail_run",
        "heartbeat",
        "get_run",
        "list_events",
        "list_events_after",
    ],
)
@pytest.mark.usefixtures("run", "unchanged")
def test_unknown_run(action: Callable[[], Any]) -> None:
    with pytest.raises(RunNotFound) as info:
        action()
    assert info.value.run_id == "no-such-run"
    assert RunEvent.objects.filter(run_id="no-such-run").count() == 0


def test_a_deleted_run_object_is_not_found(run: Run) -> None:
    Run.objects.filter(pk=run.pk).delete()
    before = snapshot()
    for action in (
        lambda: services.append_events(run, [GOOD_EVENT]),
        lambda: services.complete_run(run),
        lambda: services.fail_run(run),
        lambda: services.heartbeat(run),
        lambda: services.list_events(run),
    ):
        with pytest.raises(RunNotFound):
            action()
    assert snapshot() == before


@pytest.mark.django_db
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1, "60", True])
def test_durations_are_checked_alike(bad: Any) -> None:
    # prune_outbox and fail_stale_runs share one rule: seconds or a timedelta, finite.
    for action in (services.prune_outbox, services.fail_stale_runs):
        with pytest.raises(InvalidInput) as info:
            action(bad)
        assert info.value.field == "older_than"
    with pytest.raises(InvalidInput):
        services.fail_stale_runs(0)  # stale after 0 s would fail every active run
    assert services.prune_outbox(0) == 0  # prune everything published: allowed
