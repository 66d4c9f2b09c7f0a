"""OpenTelemetry spans around publishes and service calls (extra ``otel``:
``pip install runs_app[otel]``).

Without ``opentelemetry-api`` installed every function here is a no-op that costs one cached
lookup, and :func:`traced` returns the service function itself (no wrapper at all). With the
API but no SDK configured, spans are non-recording and carry no context, so no ``traceparent``
is added to messages either: the trace context travels only when a tracer provider (the
operator's SDK set-up) gives the publish a real span.

This module never queries the database: the attributes come from the arguments and from the
fields a ``Run`` instance already holds.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from types import ModuleType
from typing import Any, ParamSpec, TypeVar, cast

from .publishers import Message

TRACER_NAME = "runs_app"

P = ParamSpec("P")
R = TypeVar("R")

#: The OpenTelemetry context the innermost traced service call in progress was called in (its
#: caller's span current), or None outside one: see current_trace_context.
_caller_context: ContextVar[Any] = ContextVar("runs_app_service_caller", default=None)

#: The W3C trace context headers, which are also the CloudEvents distributed-tracing extension
#: attributes (``traceparent``, ``tracestate``).
TRACE_CONTEXT_KEYS = ("traceparent", "tracestate")


@functools.cache
def _otel() -> tuple[ModuleType, ModuleType] | None:
    """``(opentelemetry.trace, opentelemetry.propagate)``, or None when the API is absent."""
    try:
        from opentelemetry import propagate, trace
    except ImportError:
        return None
    return trace, propagate


def enabled() -> bool:
    """True when ``opentelemetry-api`` can be imported."""
    return _otel() is not None


def current_trace_context() -> dict[str, str]:
    """The caller's current span as W3C trace context headers (``traceparent``, and
    ``tracestate`` when there is one), for a run to keep (``Run.trace_context``) so that its
    messages carry it; ``{}`` when OpenTelemetry is absent or there is no valid current span.

    Inside a traced service call (``create_run``), the span of that call's caller (the job's),
    not the call's own span: a run is created in its job's trace, not in ``create_run``'s."""
    otel = _otel()
    if otel is None:
        return {}
    trace, propagate = otel
    context = _caller_context.get()  # None outside a traced call: the current context
    if not trace.get_current_span(context).get_span_context().is_valid:
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    return {key: value for key, value in carrier.items() if key in TRACE_CONTEXT_KEYS}


@contextmanager
def publish_span(
    messages: Sequence[Message], *, system: str, destination_template: str | None = None
) -> Iterator[dict[str, str]]:
    """A PRODUCER span named ``runs_app publish`` around one ``publish()`` call of one run's
    messages: a child of the run's trace context when the run has one (the job that created
    it), linked to the caller's current span (the relay's), else a child of the caller's span.

    Yields the span's trace context as W3C headers (``{"traceparent": ..., "tracestate": ...}``,
    only the keys the propagator wrote), for the publisher to put in every message; ``{}`` when
    OpenTelemetry is absent or the span carries no valid context. An exception raised inside is
    recorded on the span (status ERROR) and propagates.
    """
    otel = _otel()
    if otel is None or not messages:
        yield {}
        return
    trace, propagate = otel
    first, last = messages[0], messages[-1]
    attributes: dict[str, Any] = {
        "messaging.system": system,
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.batch.message_count": len(messages),
        "runs_app.run_id": first.run_id,
        "runs_app.scope": first.scope,
        "runs_app.seq.first": first.seq,
        "runs_app.seq.last": last.seq,
    }
    if destination_template is not None:
        # The template, not the subject: one span covers messages of several subjects.
        attributes["messaging.destination.template"] = destination_template
    tracer = trace.get_tracer(TRACER_NAME)
    parent = None
    links = []
    if first.trace_context:
        parent = propagate.extract(dict(first.trace_context))
        relay_span = trace.get_current_span().get_span_context()
        if relay_span.is_valid:
            links.append(trace.Link(relay_span))
    # record_exception / set_status_on_exception: the span says why the publish failed.
    with tracer.start_as_current_span(
        "runs_app publish",
        context=parent,
        kind=trace.SpanKind.PRODUCER,
        attributes=attributes,
        links=links,
    ) as span:
        carrier: dict[str, str] = {}
        if span.get_span_context().is_valid:
            propagate.inject(carrier)
        yield {key: value for key, value in carrier.items() if key in TRACE_CONTEXT_KEYS}


def traced(operation: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a service function: each call runs in an INTERNAL span ``runs_app <operation>``
    (e.g. ``runs_app create_run``), a child of the caller's current span.

    Attributes, all known without a query and never row data or payloads:
    ``code.function.name``; ``runs_app.run_id`` and ``runs_app.scope`` of the run the call is
    about (a ``Run`` argument gives both, a run id string only the id, a ``Run`` returned gives
    both once known); ``runs_app.model``, the label of the tracked model (a ``model``
    argument, or a flush session's). An exception is recorded on
    the span (status ERROR, ``error.type``, the exception as an event) and re-raised unchanged.

    A generator function (under ``@contextmanager``) keeps its span open until it finishes,
    so the caller's ``with`` block runs inside it (it names its run with :func:`describe_run`).
    Without ``opentelemetry-api`` the function is returned as it is: no wrapper, no cost.
    """

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        if _otel() is None:
            return func
        return _traced(func, operation)

    return decorate


def _traced(func: Callable[P, R], operation: str) -> Callable[P, R]:
    trace = _otel_trace()
    from opentelemetry.context import get_current as get_current_context

    name = f"runs_app {operation}"
    kind = trace.SpanKind.INTERNAL
    function_name = f"{func.__module__}.{func.__qualname__}"
    read = _arguments_reader(func)

    def start(tracer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # The attributes known before the call are given to the span's start (one copy, and a
        # sampler sees them), not set one by one (each set_attribute takes the span's lock).
        attributes = {"code.function.name": function_name, **_call_attributes(read, args, kwargs)}
        return tracer.start_as_current_span(name, kind=kind, attributes=attributes)

    if inspect.isgeneratorfunction(func):

        @functools.wraps(func)
        def generator_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            tracer = _tracer(trace)
            if tracer is None:
                return (yield from cast(Iterator[Any], func(*args, **kwargs)))
            with start(tracer, args, kwargs) as span:
                try:
                    # yield from: the caller's send(), throw() and close() reach the function.
                    return (yield from cast(Iterator[Any], func(*args, **kwargs)))
                except Exception as exc:
                    _record_error_type(span, exc)
                    raise

        return cast(Callable[P, R], generator_wrapper)

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        tracer = _tracer(trace)
        if tracer is None:
            return func(*args, **kwargs)
        caller = _caller_context.set(get_current_context())
        try:
            with start(tracer, args, kwargs) as span:
                try:
                    result = func(*args, **kwargs)
                except Exception as exc:
                    _record_error_type(span, exc)
                    raise
                _describe_result(span, result)
                return result
        finally:
            _caller_context.reset(caller)

    return wrapper


#: (the global tracer provider, its ``runs_app`` tracer or None): one slot, replaced whenever
#: the provider is (set by the operator's SDK set-up, or swapped by a test).
_tracer_slot: tuple[Any, Any] = (None, None)


def _tracer(trace: ModuleType) -> Any:
    """The ``runs_app`` tracer of the global tracer provider, or None when no SDK provider is
    set: the API alone makes only non-recording spans, which nothing would see, so the call
    runs without one (the API's nested context managers cost more than the rest of the
    wrapper). An SDK's ``get_tracer`` builds a new tracer each time: kept per provider."""
    global _tracer_slot
    provider = trace.get_tracer_provider()
    cached_provider, tracer = _tracer_slot
    if provider is not cached_provider:
        no_sdk = isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
        tracer = None if no_sdk else provider.get_tracer(TRACER_NAME)
        _tracer_slot = (provider, tracer)
    return tracer


def _otel_trace() -> ModuleType:
    otel = _otel()
    assert otel is not None
    return otel[0]


_Reader = Callable[[tuple[Any, ...], dict[str, Any]], tuple[Any, Any]]


def _arguments_reader(func: Callable[..., Any]) -> _Reader:
    """A function ``(args, kwargs) -> (the run argument, the model argument)`` for ``func``,
    from its parameter names, worked out once at decoration: the run is the parameter ``run``
    or ``run_id``, or ``self`` (a flush session); the model the parameter ``model``."""
    parameters = list(inspect.signature(func).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)

    def position(*candidates: str) -> tuple[int | None, str | None]:
        """(index among the positional arguments or None, keyword name) of the parameter."""
        for index, parameter in enumerate(parameters):
            if parameter.name in candidates:
                return (index if parameter.kind in positional else None), parameter.name
        return None, None

    run_index, run_name = position("run", "run_id", "self")
    model_index, model_name = position("model")

    def read(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        run = model = None
        if run_index is not None and run_index < len(args):
            run = args[run_index]
        elif run_name is not None:
            run = kwargs.get(run_name)
        if model_index is not None and model_index < len(args):
            model = args[model_index]
        elif model_name is not None:
            model = kwargs.get(model_name)
        return run, model

    return read


@functools.cache
def _run_class() -> type[Any]:
    # Imported on first use: this module is imported by the publishers, models need the app
    # registry, and a traced call happens only once it is ready.
    from .models import Run

    return Run


def _call_attributes(
    read: _Reader, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    from .models import RUN_ID_MAX_LENGTH

    attributes: dict[str, Any] = {}
    run, model = read(args, kwargs)
    if isinstance(run, str):
        # Not validated yet: kept only when it could be a run id at all.
        if 0 < len(run) <= RUN_ID_MAX_LENGTH:
            attributes["runs_app.run_id"] = run
    elif isinstance(run, _run_class()):
        attributes.update(_run_attributes(run))
    elif run is not None:
        # A flush session: its run id (validated when it was made) and its model.
        run_id = getattr(run, "run_id", None)
        if isinstance(run_id, str):
            attributes["runs_app.run_id"] = run_id
        label = getattr(getattr(run, "spec", None), "label", None)
        if isinstance(label, str):
            attributes["runs_app.model"] = label
    meta = getattr(model, "_meta", None)
    if isinstance(model, type) and meta is not None:
        attributes["runs_app.model"] = meta.label_lower  # as the ledgers name it
    return attributes


def describe_run(run: Any) -> None:
    """Put the run's id and scope on the current span: for a traced generator (``track_run``),
    whose run exists only once it is running."""
    otel = _otel()
    if otel is not None:
        _describe_result(otel[0].get_current_span(), run)


def _describe_result(span: Any, result: Any) -> None:
    if isinstance(result, tuple) and result:  # ensure_run: (run, created)
        result = result[0]
    if isinstance(result, _run_class()) and span.is_recording():
        span.set_attributes(_run_attributes(result))


def _run_attributes(run: Any) -> dict[str, str]:
    # From the instance's loaded fields only: a deferred field would cost a query.
    fields = run.__dict__
    attributes = {}
    if isinstance(fields.get("id"), str):
        attributes["runs_app.run_id"] = fields["id"]
    if isinstance(fields.get("scope"), str):
        attributes["runs_app.scope"] = fields["scope"]
    return attributes


def _record_error_type(span: Any, exc: Exception) -> None:
    # The status, its description and the exception event are start_as_current_span's.
    if span.is_recording():
        kind = type(exc)
        span.set_attribute("error.type", f"{kind.__module__}.{kind.__qualname__}")
