"""The status snapshot: what the daemon knows about itself, its services and their backends,
as frozen dataclasses. The daemon and the health engine build it; the metrics collector reads
it in-process; `to_json` is the document the status socket sends (`ipvslb status --json`) and
`Snapshot.from_json` reads that document back for `ipvslb status`, the demo and the benches."""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:   # imported when read (ipvslb.health builds these types)
    from ipvslb.health.states import State


class SnapshotError(ValueError):
    """A status document that is not what this version sends: names the key at fault."""


@dataclass(frozen=True)
class BackendCounters:
    """Evidence counted per backend since the daemon started (ipvslb.health.backend.COUNTERS)."""

    successes: int = 0
    hard_failures: int = 0
    soft_failures: int = 0
    quarantines: int = 0
    probes_ok: int = 0
    probes_failed: int = 0
    client_closes_in_syn_sent: int = 0


@dataclass(frozen=True)
class ConnectSeconds:
    """Histogram of a backend's timed connects: cumulative counts per bucket of
    ipvslb.metrics.CONNECT_BUCKETS (the last one +Inf), and their sum in seconds."""

    buckets: tuple[int, ...]
    sum: float


@dataclass(frozen=True)
class BackendSnapshot:
    endpoint: str            # "addr:port", as status and metrics label it
    address: str
    port: int
    state: State
    weight: int              # what IPVS has (0 while drained)
    configured_weight: int
    since: float             # monotonic time of the last state change
    last_evidence: str | None
    last_evidence_at: float | None
    last_success_at: float | None
    withheld: str | None
    failure_streak: int
    probe_outstanding: bool
    next_probe_at: float | None
    backoff: float
    probation_until: float | None
    connect_p99: float | None
    connect_deadline: float | None
    counters: BackendCounters
    transitions: Mapping[str, int]   # "old->new": count
    # Added by the daemon (the health engine does not know them).
    weight_history: tuple[tuple[float, int], ...] = ()   # (monotonic time, weight) it set
    connect_seconds: ConnectSeconds | None = None        # in the document only when timed
    drained: bool = False                                # in the document only when True


@dataclass(frozen=True)
class ServiceSnapshot:
    name: str
    protocol: str
    vip: str                 # "addr:port"
    frozen: bool
    freeze_reason: str | None
    backends: tuple[BackendSnapshot, ...]


@dataclass(frozen=True)
class ReconcileCounts:
    runs: int
    writes: int
    last_seconds: float


@dataclass(frozen=True)
class NotifyCounts:
    """ipvslb.notify.Notifier's counters."""

    failures: int
    dropped: int


@dataclass(frozen=True)
class Snapshot:
    version: str
    pid: int
    now: float               # the daemon's monotonic clock, for the times above
    started: float
    attribution: str         # how the tracer finds the backend: kprobe, conntable, none
    lost_records: int
    missed_runs: int
    records: Mapping[str, int]           # tracer records by kind
    counted_successes: int
    reconcile: ReconcileCounts
    reloads: Mapping[str, int]           # by outcome: ok, failed (absent while 0)
    internal_errors: Mapping[str, int]   # by task (absent while 0)
    heartbeats: Mapping[str, float]      # task: monotonic time it last ran
    notify: NotifyCounts
    last_reload_success: float           # Unix time
    services: tuple[ServiceSnapshot, ...]

    def to_json(self) -> dict[str, Any]:
        """The status socket's document (plain dicts, lists and scalars)."""
        return _to_json(self)

    @classmethod
    def from_json(cls, doc: object) -> Snapshot:
        """The snapshot a status document describes. SnapshotError naming the key when one
        is missing, unknown or of the wrong type (a daemon of another version, or not ipvslb)."""
        return _from_json(cls, doc, "")


# Keys left out of the document while they hold their default.
_OMITTED_AT_DEFAULT = {(BackendSnapshot, "connect_seconds"), (BackendSnapshot, "drained")}


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if (type(value), f.name) in _OMITTED_AT_DEFAULT and item == f.default:
                continue
            out[f.name] = _to_json(item)
        return out
    if isinstance(value, _state_type()):
        return str(value)
    if isinstance(value, Mapping):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    return value


T = TypeVar("T")


def _from_json(cls: type[T], doc: object, where: str) -> T:
    if not isinstance(doc, dict):
        raise SnapshotError(f"{where or 'the document'}: expected an object, got {_kind(doc)}")
    hints = typing.get_type_hints(cls, localns={"State": _state_type()})
    fields = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = [k for k in doc if k not in fields]
    if unknown:
        raise SnapshotError(f"{_at(where, str(unknown[0]))}: unknown key (a daemon of another version?)")
    values = {}
    for name in fields:
        key = _at(where, name)
        if name not in doc:
            if (cls, name) in _OMITTED_AT_DEFAULT:
                continue
            raise SnapshotError(f"{key}: missing (a daemon of another version?)")
        values[name] = _value(hints[name], doc[name], key)
    return cls(**values)


def _value(hint: Any, value: object, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _from_json(hint, value, where)  # type: ignore[arg-type]
    if hint is _state_type():
        State = _state_type()
        if not isinstance(value, str) or value not in {str(s) for s in State}:
            raise SnapshotError(f"{where}: {_kind(value)} is not a health state")
        return State(value)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list):
            raise SnapshotError(f"{where}: expected a list, got {_kind(value)}")
        if args[-1] is Ellipsis:
            return tuple(_value(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise SnapshotError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_value(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is Mapping:
        _, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise SnapshotError(f"{where}: expected an object, got {_kind(value)}")
        return {str(k): _value(item, v, _at(where, str(k))) for k, v in value.items()}
    return _scalar(hint, value, where)


def _scalar(hint: Any, value: object, where: str) -> Any:
    # bool is an int to Python but not to the document; an int is a fine float.
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value  # type: ignore[arg-type]
    elif hint is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - a field type this module does not handle
        raise TypeError(f"{where}: no reader for {hint!r}")
    if not ok:
        raise SnapshotError(f"{where}: expected {hint.__name__}, got {_kind(value)}")
    return value


def _state_type() -> type[State]:
    from ipvslb.health.states import State

    return State


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _kind(value: object) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"[:80]
