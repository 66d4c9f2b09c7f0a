"""Input validation shared by every write path. Nothing is written before these pass.

Each error is an ``InvalidInput`` (or ``InvalidEvent``) naming the field and the limit it broke.
"""

from __future__ import annotations

import datetime
import json
import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..conf import MAX_DURATION_SECONDS, runs_settings
from ..exceptions import InvalidEvent, InvalidInput
from ..models import EVENT_TYPE_MAX_LENGTH, RUN_ID_MAX_LENGTH, SCOPE_MAX_LENGTH, Run

# Deeper JSON than this is refused rather than risking a RecursionError half-way.
JSON_MAX_DEPTH = 100
ERROR_MAX_LENGTH = 10_000
#: An operator's name recorded in an event (``actor=``): as long as Django's usernames may be.
ACTOR_MAX_LENGTH = 150


@dataclass(frozen=True)
class Event:
    """An event to append: ``Event("project.seen", {"key": "a"})``, like a mapping of both."""

    type: str
    payload: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PreparedEvent:
    """A validated event, ready to insert. ``payload_json``: the payload's compact JSON text when
    validation produced it already (the app's own events leave it to ``payload_text()``)."""

    type: str
    payload: dict[str, Any]
    payload_json: str | None = field(default=None, compare=False, repr=False)

    def payload_text(self) -> str:
        if self.payload_json is not None:
            return self.payload_json
        return encode_json(self.payload)


@dataclass(frozen=True)
class EncodedEvent:
    """An event the app builds itself as JSON text (the cleanup audit): inserted as it is,
    never decoded in Python."""

    type: str
    payload_json: str

    def payload_text(self) -> str:
        return self.payload_json


def _has_control_character(text: str) -> bool:
    return any(ord(char) < 32 or ord(char) == 127 for char in text)


def validate_run_id(value: Any, field_name: str = "run_id") -> str:
    if not isinstance(value, str):
        raise InvalidInput(field_name, f"must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidInput(field_name, "must not be empty", limit=RUN_ID_MAX_LENGTH)
    if len(value) > RUN_ID_MAX_LENGTH:
        raise InvalidInput(
            field_name,
            f"is {len(value)} characters; the limit is {RUN_ID_MAX_LENGTH}",
            limit=RUN_ID_MAX_LENGTH,
        )
    if any(char.isspace() for char in value) or _has_control_character(value):
        raise InvalidInput(
            field_name, "must not contain whitespace or control characters", limit="no whitespace"
        )
    check_encodable(field_name, value)
    return value


def new_run_id() -> str:
    return uuid.uuid4().hex


def run_id_of(run: Run | str) -> str:
    """A service's ``run`` argument is a Run or its id."""
    if isinstance(run, Run):
        return run.pk
    return validate_run_id(run, "run")


def validate_scope(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidInput("scope", f"must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidInput("scope", "must not be empty", limit=SCOPE_MAX_LENGTH)
    if len(value) > SCOPE_MAX_LENGTH:
        raise InvalidInput(
            "scope",
            f"is {len(value)} characters; the limit is {SCOPE_MAX_LENGTH}",
            limit=SCOPE_MAX_LENGTH,
        )
    if _has_control_character(value) or value != value.strip():
        raise InvalidInput(
            "scope",
            "must not contain control characters or leading/trailing whitespace",
            limit="printable",
        )
    check_encodable("scope", value)
    return value


def validate_text(
    field_name: str, value: Any, max_length: int, *, error: type[InvalidInput] = InvalidInput
) -> str:
    """A required, non-empty string of at most ``max_length`` characters, without NUL."""
    if not isinstance(value, str):
        raise error(field_name, f"must be a string, not {type(value).__name__}")
    if not value:
        raise error(field_name, "must not be empty", limit=max_length)
    if len(value) > max_length:
        raise error(
            field_name,
            f"is {len(value)} characters; the limit is {max_length}",
            limit=max_length,
        )
    if "\x00" in value:
        raise error(field_name, "contains a NUL character", limit="no NUL")
    check_encodable(field_name, value, error)
    return value


def validate_actor(value: Any) -> str | None:
    """Who asked for an operator service (``actor=``, e.g. the admin user's username): None
    (nobody named), or a non-empty string of at most ``ACTOR_MAX_LENGTH`` characters without
    control characters."""
    if value is None:
        return None
    actor = validate_text("actor", value, ACTOR_MAX_LENGTH)
    if _has_control_character(actor):
        raise InvalidInput("actor", "must not contain control characters", limit="printable")
    return actor


def error_text(value: Any) -> str:
    """Free-form error text for the ledger: a string, cut to ``ERROR_MAX_LENGTH``, NUL removed."""
    if not isinstance(value, str):
        raise InvalidInput("error", f"must be a string, not {type(value).__name__}")
    check_encodable("error", value)
    return value.replace("\x00", "")[:ERROR_MAX_LENGTH]


def internal_error_text(value: str) -> str:
    """``error_text`` for messages the app builds from exceptions (whose text may come from a
    source and hold anything): never raises; lone surrogates become ``\\udxxx`` escapes."""
    if not _encodable(value):
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value.replace("\x00", "")[:ERROR_MAX_LENGTH]


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_encodable(field_name: str, text: str, error: type[InvalidInput] = InvalidInput) -> None:
    """Refuse text that UTF-8 cannot encode (a lone surrogate such as ``"\\ud800"``): no
    database can store it, and the driver would fail half-way through a write."""
    if not _encodable(text):
        position = next(i for i, char in enumerate(text) if 0xD800 <= ord(char) <= 0xDFFF)
        raise error(
            field_name,
            f"contains a lone surrogate (U+{ord(text[position]):04X} at position {position}); "
            "text must be valid Unicode",
            limit="valid UTF-8",
        )


def _plain_json_value(field_name: str, value: Any, depth: int, error: type[InvalidInput]) -> Any:
    """Check a JSON value and return it as plain JSON types (any Mapping becomes a dict, a tuple a
    list), so that both ``json.dumps`` and the JSONField can encode it."""
    if depth > JSON_MAX_DEPTH:
        raise error(
            field_name, f"is nested deeper than {JSON_MAX_DEPTH} levels", limit=JSON_MAX_DEPTH
        )
    if isinstance(value, str):
        if "\x00" in value:
            raise error(field_name, "contains a NUL character (\\u0000)", limit="no NUL")
    elif isinstance(value, Mapping):
        plain: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise error(field_name, f"has a non-string key {key!r}; JSON keys are strings")
            if "\x00" in key:
                raise error(field_name, "has a key with a NUL character (\\u0000)", limit="no NUL")
            plain[key] = _plain_json_value(field_name, item, depth + 1, error)
        return plain
    elif isinstance(value, list | tuple):
        return [_plain_json_value(field_name, item, depth + 1, error) for item in value]
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise error(field_name, f"contains {value!r}, which JSON cannot represent")
    elif value is not None and not isinstance(value, bool | int):
        raise error(field_name, f"contains a {type(value).__name__}, which is not JSON")
    return value


# The one JSON encoding of the app: compact, UTF-8 as is, and strict (NaN and Infinity are not
# JSON, and PostgreSQL's jsonb refuses them).
encode_json = json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode
# One string as JSON, as encode_json writes it: the C encoder behind json.dumps, without its
# overhead (for JSON texts assembled from parts already encoded).
encode_json_string = json.encoder.encode_basestring

_JSON_SCALARS = frozenset({str, int, float, bool, type(None)})

PAYLOAD_LIMIT_NAME = "RUNS_APP['MAX_PAYLOAD_BYTES']"


def encode_json_object(
    field_name: str,
    value: Any,
    *,
    error: type[InvalidInput] = InvalidInput,
    limit: int | None = None,
    limit_name: str = PAYLOAD_LIMIT_NAME,
) -> str:
    """Validate a JSON object and return its compact JSON text.

    Refused: anything but a mapping with string keys, values that are not JSON (NaN, Infinity,
    sets, objects...), NUL characters (PostgreSQL cannot store them), nesting deeper than
    ``JSON_MAX_DEPTH``, and more than ``MAX_PAYLOAD_BYTES`` bytes of UTF-8 (``limit``: that
    setting, if the caller read it already).
    """
    text = _fast_json_text(value)
    if text is None:
        text = _plain_json_object(field_name, value, error)[1]
    _check_size(field_name, text, error, limit, limit_name)
    return text


def encode_json_value(
    field_name: str,
    value: Any,
    *,
    error: type[InvalidInput] = InvalidInput,
    limit: int | None = None,
    limit_name: str = PAYLOAD_LIMIT_NAME,
) -> str:
    """Validate any JSON value (object, array or scalar) and return its compact JSON text,
    refused as ``encode_json_object`` refuses (NaN, sets, NUL, depth, size). ``limit_name``: what
    the size error calls the limit."""
    if type(value) is dict:
        return encode_json_object(
            field_name, value, error=error, limit=limit, limit_name=limit_name
        )
    plain = _plain_json_value(field_name, value, 1, error)
    try:
        text = encode_json(plain)
    except ValueError as exc:  # an int of more than sys.get_int_max_str_digits() digits
        raise error(field_name, f"cannot be written as JSON ({exc})") from exc
    _check_size(field_name, text, error, limit, limit_name)
    return text


def validate_json_object(
    field_name: str, value: Any, *, error: type[InvalidInput] = InvalidInput
) -> dict[str, Any]:
    """Validate a JSON object (as ``encode_json_object``) and return it as a plain dict."""
    return validated_json_object(field_name, value, error=error)[0]


def validated_json_object(
    field_name: str, value: Any, *, error: type[InvalidInput] = InvalidInput
) -> tuple[dict[str, Any], str]:
    """Validate a JSON object (as ``encode_json_object``): a plain copy of it and its JSON text."""
    text = _fast_json_text(value)
    if text is None:
        plain, text = _plain_json_object(field_name, value, error)
    else:
        plain = json.loads(text)  # the copy, in C: what the database will hand back
    _check_size(field_name, text, error, None)
    return plain, text


def _fast_json_text(value: Any) -> str | None:
    """The JSON text of ``value`` if it is certainly valid plain JSON, else None.

    The fast path of validation: one encoding in C instead of a walk in Python. It answers None
    (and the caller walks the value with ``_plain_json_value``, which finds the precise error or
    copies the mapping/tuple json cannot encode) whenever it cannot prove the value valid:
    - json refuses it (a set, an object, NaN, Infinity, a non-dict mapping, a huge int...);
    - the text has an escaped NUL ``\\u0000`` (json escapes every NUL; this may also be a
      literal backslash followed by ``u0000``, which the walk then accepts);
    - it has as many brackets as the depth limit: ``JSON_MAX_DEPTH - 1`` containers put no value
      deeper than the limit, and brackets inside strings only overcount;
    - a key is not a ``str`` (json would turn ``1``, ``True`` or ``None`` into a string key) or a
      container is a subclass or a tuple: ``_plain_keys`` checks the exact types of dicts only.
    """
    if type(value) is not dict:
        return None
    try:
        text = encode_json(value)
    except (TypeError, ValueError, RecursionError):
        return None
    if "\\u0000" in text or text.count("{") + text.count("[") >= JSON_MAX_DEPTH:
        return None
    return text if _plain_keys(value) else None


def _plain_keys(value: dict[Any, Any] | list[Any]) -> bool:
    """Every dict in ``value`` has str keys and holds only dicts, lists and JSON scalars (exact
    types). Recursion is bounded: the caller checked the nesting first."""
    items = value.values() if type(value) is dict else value
    if type(value) is dict and not all(type(key) is str for key in value):
        return False
    for item in items:
        kind = type(item)
        if kind is dict or kind is list:
            if not _plain_keys(item):
                return False
        elif kind not in _JSON_SCALARS:
            return False
    return True


def _check_size(
    field_name: str,
    text: str,
    error: type[InvalidInput],
    limit: int | None,
    limit_name: str = PAYLOAD_LIMIT_NAME,
) -> None:
    if text.isascii():
        size = len(text)
    else:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise error(field_name, "contains text that is not valid Unicode") from exc
    if limit is None:
        limit = runs_settings.MAX_PAYLOAD_BYTES
    if size > limit:
        raise error(
            field_name,
            f"is {size} bytes of JSON; the limit is {limit} ({limit_name})",
            limit=limit,
        )


def _plain_json_object(
    field_name: str, value: Any, error: type[InvalidInput]
) -> tuple[dict[str, Any], str]:
    """The detailed walk: the precise error, or a plain copy and its text (size not checked)."""
    if not isinstance(value, Mapping):
        raise error(field_name, f"must be a JSON object (a dict), not {type(value).__name__}")
    plain: dict[str, Any] = _plain_json_value(field_name, value, 1, error)
    try:
        text = encode_json(plain)
    except ValueError as exc:  # an int of more than sys.get_int_max_str_digits() digits
        raise error(field_name, f"cannot be written as JSON ({exc})") from exc
    return plain, text


def prepare_event(value: Any, field_name: str = "event") -> PreparedEvent:
    if isinstance(value, Event):
        event_type, payload = value.type, value.payload
    elif isinstance(value, Mapping):
        unknown = sorted(str(key) for key in value if key not in ("type", "payload"))
        if unknown:
            raise InvalidEvent(
                field_name,
                f"has unknown key(s) {', '.join(unknown)}; an event has type and payload",
            )
        if "type" not in value:
            raise InvalidEvent(f"{field_name}.type", "is missing", limit=EVENT_TYPE_MAX_LENGTH)
        event_type, payload = value["type"], value.get("payload", {})
    else:
        raise InvalidEvent(
            field_name, f"must be a mapping with type and payload, not {type(value).__name__}"
        )
    if payload is None:
        payload = {}
    validate_text(f"{field_name}.type", event_type, EVENT_TYPE_MAX_LENGTH, error=InvalidEvent)
    plain, text = validated_json_object(f"{field_name}.payload", payload, error=InvalidEvent)
    return PreparedEvent(event_type, plain, text)


def prepare_events(events: Iterable[Any]) -> list[PreparedEvent]:
    if isinstance(events, Mapping | Event | str | bytes):
        raise InvalidEvent("events", "must be a list of events, not a single event")
    return [prepare_event(event, f"events[{index}]") for index, event in enumerate(events)]


def validate_duration(
    field_name: str, value: Any, *, allow_zero: bool = False
) -> datetime.timedelta:
    """A duration given as seconds (int or float) or a timedelta: finite, positive (or zero
    when ``allow_zero``), at most ``MAX_DURATION_SECONDS`` (so ``now - duration`` cannot
    overflow)."""
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond any float
            seconds = math.inf if value > 0 else -math.inf
    else:
        raise InvalidInput(
            field_name, f"must be seconds or a timedelta, not {type(value).__name__}"
        )
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        rule = ">= 0" if allow_zero else "> 0"
        raise InvalidInput(field_name, f"must be a finite number {rule}, not {value!r}", limit=rule)
    if seconds > MAX_DURATION_SECONDS:
        raise InvalidInput(
            field_name,
            f"is {value!r}; the limit is {MAX_DURATION_SECONDS} seconds (100 years)",
            limit=MAX_DURATION_SECONDS,
        )
    return datetime.timedelta(seconds=seconds)


def validate_positive_int(field_name: str, value: Any, default: Any) -> int:
    """``value`` (``default`` when None) as a positive integer (bools refused)."""
    value = default if value is None else value
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidInput(field_name, f"must be a positive integer, not {value!r}", limit=1)
    return value
