"""Rows of a tracked model: from what a source gives to values the upsert can write.

A row is a mapping of field names to values (a foreign key by its name or its attname, with the
related row's id) or an instance of the model. Each value is checked by the model's own field:

* text fields take ``str`` only (a number silently turned into a key ``"7"`` would collide with
  nothing and match nothing); empty only if ``blank=True`` and never in a key; at most
  ``max_length``; no NUL, no lone surrogate; then the field's other validators;
* JSON fields take any JSON value, strictly (no NaN, no set, string keys only), at most
  ``MAX_PAYLOAD_BYTES``; then the field's validators;
* every other field converts with its own ``to_python`` (an int for an integer field, an ISO
  string or a datetime for a datetime field, a UUID or its text...), then its validators (the
  integer ranges of the database, ``max_digits``...) and choices.

A field the row leaves out (or gives as None while it is not nullable) gets its default, or NULL
if it is nullable; a key field never does.
The first problem raises ``InvalidInput`` naming ``rows[i].field`` (``<sync_name>[i].field``)
and the limit. A row must also fit, with its stamps, in one ``<sync_name>.removed`` audit event
(``MAX_PAYLOAD_BYTES``), so that removing it can always be audited.
"""

from __future__ import annotations

import datetime
import math
import uuid
from collections.abc import Callable, Mapping
from decimal import Decimal
from types import SimpleNamespace
from typing import Any, NamedTuple

from django.core.exceptions import ValidationError
from django.core.validators import (
    MaxLengthValidator,
    MaxValueValidator,
    MinValueValidator,
    ProhibitNullCharactersValidator,
)
from django.db import models
from django.db.models import Field, Value

from ..conf import runs_settings
from ..db import column
from ..exceptions import InvalidInput
from ..tracking import SyncSpec
from .validation import check_encodable, encode_json, encode_json_string, encode_json_value

#: Bytes a value other than text or JSON takes at most in an audit record (a datetime with its
#: offset, a UUID, a 64-bit integer, a decimal of the usual precisions...).
SCALAR_BOUND = 64

#: Bytes of a timestamp in an audit record: "2026-12-02T13:03:03.135033+00:00" and its quotes.
TIMESTAMP_SIZE = 34

#: Bytes of an integer primary key in an audit record (a bigint has at most 20 characters).
INTEGER_PK_SIZE = 20

MISSING: Any = object()

Cleaner = Callable[[Any, str], Any]


class PreparedRow(NamedTuple):
    """A checked row: its key (for ordering and duplicates) and its values, in the order of
    ``RowSchema.columns`` (a JSON field's value is its compact JSON text)."""

    key: tuple[Any, ...]
    values: tuple[Any, ...]


class RowSchema:
    """How rows of one tracked model are checked. Built once per flush session."""

    def __init__(self, spec: SyncSpec, scope: str, run_id: str) -> None:
        scope_field = spec.scope
        scope_length = getattr(scope_field, "max_length", None)
        if scope_field is not None and scope_length is not None and len(scope) > scope_length:
            # SQLite would store it anyway, PostgreSQL fail the first batch: refuse it here.
            raise InvalidInput(
                "scope",
                f"is {len(scope)} characters; {spec.label}.{scope_field.name} holds at most "
                f"{scope_length}",
                limit=scope_length,
            )
        self.spec = spec
        self.model = spec.model
        self.rows_name = spec.rows_name
        self.payload_limit = runs_settings.MAX_PAYLOAD_BYTES
        #: The project's fields an insert writes: all but those only the database has a default
        #: for (``db_default``), which the insert leaves to the database.
        self.defaulted = tuple(field for field in spec.defaulted if not _database_fills(field))
        #: Columns written by an insert: the owned fields (keys first), then the defaulted ones.
        self.columns: tuple[Field[Any, Any], ...] = spec.owned + self.defaulted
        self.kinds = tuple(_kind(field) for field in self.columns)
        self.key_count = len(spec.key)
        self._cleaners = [_cleaner(field, i < self.key_count) for i, field in enumerate(spec.owned)]
        # The project's own values, as Django's create() would insert them: "" for a text
        # field without a default is one, even if the field is not blank=True.
        self._default_cleaners = [_cleaner(field, False, empty=True) for field in self.defaulted]
        # A row's names: a field's name, and a foreign key's attname too ("owner" or "owner_id").
        self._names = [
            (field.name, field.attname if field.attname != field.name else None)
            for field in spec.owned
        ]
        self._known = {name for pair in self._names for name in pair if name}
        # Per owned field: what _values needs, looked up once.
        self._plan = [
            (
                name,
                attname,
                clean,
                not field.null and (field.has_default() or _is_automatic_time(field)),
                i < self.key_count,
                field,
            )
            for i, ((name, attname), clean, field) in enumerate(
                zip(self._names, self._cleaners, spec.owned, strict=True)
            )
        ]
        self._defaulted = list(zip(self._default_cleaners, self.defaulted, strict=True))
        self.budget = runs_settings.MAX_PAYLOAD_BYTES - envelope_size(scope, spec.label)
        self._overhead = _record_overhead(spec, scope, run_id)
        # The size bound's constant part: a value that is neither text nor JSON counts
        # SCALAR_BOUND (a None, 4, is less); text, JSON and bytes are measured per row...
        self._sized = tuple(
            (i, kind) for i, kind in enumerate(self.kinds) if kind in ("text", "json", "binary")
        )
        self._fixed_bound = self._overhead + SCALAR_BOUND * (len(self.kinds) - len(self._sized))
        # ...unless every one of them is text of a bounded length and even the longest row fits:
        # then no row can outgrow the budget and the check is skipped.
        lengths = [getattr(self.columns[i], "max_length", None) for i, _ in self._sized]
        self._always_fits = (
            all(
                kind == "text" and length is not None
                for (_, kind), length in zip(self._sized, lengths, strict=True)
            )
            and self._fixed_bound + sum(6 * (length or 0) + 4 for length in lengths) <= self.budget
        )

    def prepare(self, value: Any, index: int) -> PreparedRow:
        where = f"{self.rows_name}[{index}]"
        row: Mapping[str, Any]
        if type(value) is not dict and isinstance(value, self.model):
            row = {f.attname: getattr(value, f.attname) for f in self.spec.owned}
        elif type(value) is dict or isinstance(value, Mapping):
            row = value
            if not self._known.issuperset(row):
                unknown = sorted(str(name) for name in row if name not in self._known)
                raise InvalidInput(
                    where,
                    f"has unknown field(s) {', '.join(unknown)}; rows of {self.spec.label} "
                    f"may set {', '.join(name for name, _ in self._names)}",
                )
        else:
            raise InvalidInput(
                where,
                "must be a mapping of field names to values or a "
                f"{self.model.__name__} instance, not {type(value).__name__}",
            )
        try:
            values = self._values(row)
        except InvalidInput as exc:
            # The cleaners name the field only: the row's place is added here, on the error
            # path, rather than formatted for every value of every row.
            raise InvalidInput(f"{where}.{exc.field}", exc.message, limit=exc.limit) from None
        if not self._always_fits:
            self._check_record_size(where, values)
        key = (values[0],) if self.key_count == 1 else tuple(values[: self.key_count])
        return PreparedRow(key, tuple(values))

    def _values(self, row: Mapping[str, Any]) -> list[Any]:
        values: list[Any] = []
        append = values.append
        for name, attname, clean, none_is_default, is_key, field in self._plan:
            item = row.get(name, MISSING)
            if attname is not None and attname in row:
                if item is not MISSING:
                    raise InvalidInput(name, f"is given twice ({name}, {attname})")
                item = row[attname]
            if item is MISSING or (item is None and none_is_default):
                item = _default(field, name, is_key)
            append(clean(item, name))
        for clean, field in self._defaulted:
            append(clean(_insert_default(field), field.name))
        return values

    def _check_record_size(self, where: str, values: list[Any]) -> None:
        # Cheap bound first (a character takes at most 6 bytes escaped in a JSON string, a JSON
        # text at most 4 bytes a character as UTF-8 with the database's spacing); the exact
        # size only near the limit.
        bound = self._fixed_bound
        for i, kind in self._sized:
            value = values[i]
            if value is None:
                bound += 4
            elif kind == "text":
                bound += 6 * len(value) + 2
            elif kind == "binary":
                bound += 2 * len(value) + 6
            else:  # JSON text
                bound += 4 * len(value)
        if bound <= self.budget:
            return
        sizes = [_value_size(value, kind) for value, kind in zip(values, self.kinds, strict=False)]
        size = self._overhead + sum(sizes)
        if size > self.budget:
            largest = max(range(len(sizes)), key=sizes.__getitem__)
            limit = self.payload_limit
            raise InvalidInput(
                f"{where}.{self.columns[largest].name}",
                f"with the rest of its row makes a {self.spec.event_prefix}.removed audit "
                f"record of about {size} bytes, too big for one event: the limit is {limit} "
                "(RUNS_APP['MAX_PAYLOAD_BYTES'])",
                limit=limit,
            )


def envelope_size(scope: str, label: str) -> int:
    """Bytes of a ``<prefix>.removed`` payload without rows (``{"scope", "model", "rows"}``)."""
    return len(encode_json({"scope": scope, "model": label, "rows": []}).encode())


def _record_overhead(spec: SyncSpec, scope: str, run_id: str) -> int:
    """A removed row's record besides its owned and defaulted values: braces, every column's
    name, the scope, the primary key when it is automatic, and the stamps (both runs taken as
    long as this one's id: an estimate, which is why a record that outgrows the limit still
    gets an event of its own when it is removed)."""
    meta = spec.model._meta
    names = sum(len(encode_json_string(column(f))) + 2 for f in meta.concrete_fields)
    stamps = 2 * len(encode_json(run_id).encode()) + 2 * TIMESTAMP_SIZE
    pk = 0
    if meta.pk not in spec.owned:
        pk = INTEGER_PK_SIZE if isinstance(meta.pk, models.IntegerField) else SCALAR_BOUND
    scope_size = len(encode_json(scope).encode()) if spec.scope is not None else 0
    return 2 + names + stamps + pk + scope_size


def _value_size(value: Any, kind: str) -> int:
    if value is None:
        return 4
    if kind == "text":
        return len(encode_json_string(value).encode())
    if kind == "json":
        return len(value.encode())
    if kind == "binary":
        return 2 * len(value) + 6  # "\\x" and two hex digits a byte, quoted
    return len(str(value)) + 2


def _kind(field: Field[Any, Any]) -> str:
    if isinstance(field, models.JSONField):
        return "json"
    if isinstance(field, models.BinaryField):
        return "binary"  # in an audit record: hex text, two characters a byte
    if isinstance(field, models.CharField | models.TextField):
        return "text"
    return "other"


def _default(field: Field[Any, Any], where: str, is_key: bool) -> Any:
    if is_key:
        raise InvalidInput(where, "is missing: every row must give its key")
    if field.has_default() or _is_automatic_time(field):
        return _insert_default(field)
    if field.has_db_default() and isinstance(field.db_default, Value):
        return field.db_default.value
    if field.null:
        return None
    raise InvalidInput(where, "is missing (the field has no default and is not nullable)")


def _is_automatic_time(field: Field[Any, Any]) -> bool:
    return bool(getattr(field, "auto_now", False) or getattr(field, "auto_now_add", False))


def _insert_default(field: Field[Any, Any]) -> Any:
    """What Django's ``create()`` inserts for a field it is not given: the time for an
    ``auto_now``/``auto_now_add`` field, else the field's default."""
    if _is_automatic_time(field):
        return field.pre_save(SimpleNamespace(), True)  # type: ignore[arg-type]
    return field.get_default()


def _database_fills(field: Field[Any, Any]) -> bool:
    """A field whose only default is the database's (``db_default``)."""
    return field.has_db_default() and not field.has_default() and not _is_automatic_time(field)


def _messages(exc: ValidationError) -> str:
    return "; ".join(str(message) for message in exc.messages)


def _limit(exc: ValidationError) -> Any:
    for error in getattr(exc, "error_list", [exc]):
        params = getattr(error, "params", None) or {}
        if "limit_value" in params:
            return params["limit_value"]
    return None


def _validated(field: Field[Any, Any], validators: list[Any]) -> Callable[[Any, str], None]:
    choices = {value for value, _ in field.flatchoices} if field.choices else None

    def validate(value: Any, where: str) -> None:
        for validator in validators:
            try:
                validator(value)
            except ValidationError as exc:
                raise InvalidInput(where, _messages(exc), limit=_limit(exc)) from None
        if choices is not None and value not in choices:
            raise InvalidInput(
                where,
                f"{value!r} is not one of the field's choices",
                limit=sorted(choices, key=str),
            )

    return validate


def _cleaner(field: Field[Any, Any], is_key: bool, *, empty: bool = False) -> Cleaner:
    """``empty``: an empty text is accepted whatever ``blank`` says (a project's default)."""
    kind = _kind(field)
    null = field.null and not is_key
    if kind == "text":
        return _text_cleaner(field, is_key, null, empty)
    validate = _validated(field, list(field.validators))
    if kind == "json":
        limit = runs_settings.MAX_PAYLOAD_BYTES

        def clean_json(value: Any, where: str) -> Any:
            if value is None and null:
                return None
            text = encode_json_value(where, value, limit=limit)
            validate(value, where)
            return text

        return clean_json

    def clean(value: Any, where: str) -> Any:
        if value is None:
            if null:
                return None
            raise InvalidInput(where, "must not be null")
        try:
            converted = field.to_python(value)
        except ValidationError as exc:
            raise InvalidInput(where, _messages(exc)) from None
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidInput(where, f"cannot be converted: {exc}") from None
        if converted is None:
            if null:
                return None
            raise InvalidInput(where, "must not be null")
        if isinstance(converted, float) and not math.isfinite(converted):
            raise InvalidInput(where, f"is {converted!r}, which the database cannot compare")
        if (
            isinstance(value, float | Decimal)
            and isinstance(converted, int)
            and not isinstance(converted, bool)
            and converted != value
        ):
            # to_python is int(value): 7.9 would silently become 7, another row's key.
            raise InvalidInput(where, f"is {value!r}, not a whole number", limit="whole numbers")
        validate(converted, where)
        return converted

    return _fast_path(field, clean)


def _fast_path(field: Field[Any, Any], clean: Cleaner) -> Cleaner:
    """``clean`` behind a type test that takes, unchanged, a value the field's ``to_python``
    would return as it is and its validators would accept: an int within the column's range for
    an integer field (or a foreign key to one), a bool, a datetime, a date, a UUID. Anything
    else (None, another type, a field with choices or validators of its own) goes to ``clean``.
    (The generic path costs a few calls per value: ``to_python``, then each validator.)"""
    if field.choices:
        return clean
    target = field.target_field if isinstance(field, models.ForeignKey) else field
    validators = list(field.validators)
    if isinstance(target, models.IntegerField):
        bounds = _integer_bounds(validators)
        if bounds is None:
            return clean
        low, high = bounds

        def clean_int(value: Any, where: str) -> Any:
            if type(value) is int and low <= value <= high:
                return value
            return clean(value, where)

        return clean_int
    if validators or isinstance(field, models.ForeignKey):
        return clean
    exact: type[Any] | None = None
    if isinstance(field, models.BooleanField):
        exact = bool
    elif isinstance(field, models.DateTimeField):
        exact = datetime.datetime
    elif isinstance(field, models.DateField):
        exact = datetime.date
    elif isinstance(field, models.UUIDField):
        exact = uuid.UUID
    if exact is None:
        return clean

    def clean_exact(value: Any, where: str) -> Any:
        if type(value) is exact:
            return value
        return clean(value, where)

    return clean_exact


def _integer_bounds(validators: list[Any]) -> tuple[float, float] | None:
    """(low, high) when the only validators are Min/MaxValueValidators of fixed integer limits
    (an integer field's own: the column's range), else None."""
    low, high = -math.inf, math.inf
    for validator in validators:
        limit = validator.limit_value
        if callable(limit) or type(limit) is not int:
            return None
        if type(validator) is MinValueValidator:
            low = max(low, limit)
        elif type(validator) is MaxValueValidator:
            high = min(high, limit)
        else:
            return None
    return low, high


def _text_cleaner(field: Field[Any, Any], is_key: bool, null: bool, empty: bool) -> Cleaner:
    max_length = getattr(field, "max_length", None)
    may_be_empty = (field.blank or empty) and not is_key
    # Length and NUL are checked below, with the limit in the message; the rest (an email, a
    # URL, a slug, the project's own) by the field's validators.
    others = [
        validator
        for validator in field.validators
        if not isinstance(validator, MaxLengthValidator | ProhibitNullCharactersValidator)
    ]
    validate = _validated(field, others)
    validated = bool(others or field.choices)

    def clean_text(value: Any, where: str) -> Any:
        if type(value) is not str:
            if value is None:
                if null:
                    return None
                raise InvalidInput(where, "must not be null", limit=max_length)
            if not isinstance(value, str):
                raise InvalidInput(where, f"must be a string, not {type(value).__name__}")
        if not value and not may_be_empty:
            raise InvalidInput(where, "must not be empty", limit=max_length)
        if max_length is not None and len(value) > max_length:
            raise InvalidInput(
                where, f"is {len(value)} characters; the limit is {max_length}", limit=max_length
            )
        if "\x00" in value:
            raise InvalidInput(where, "contains a NUL character", limit="no NUL")
        if not value.isascii():  # ASCII always encodes: the common case copies nothing
            check_encodable(where, value)
        if validated:
            validate(value, where)
        return value

    return clean_text
