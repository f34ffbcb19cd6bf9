"""The status snapshot: what the daemon knows about itself, its services and their backends,
as frozen dataclasses. The daemon and the health engine build it; the metrics collector reads
it in-process; `to_json` is the document the status socket sends (`ipvslb status --json`) and
`StatusSnapshot.from_json` reads that document back for `ipvslb status`, the demo and the benches."""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

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
class StatusSnapshot:
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
        doc: dict[str, Any] = _codec(StatusSnapshot).dump(self)
        return doc

    @classmethod
    def from_json(cls, doc: object) -> StatusSnapshot:
        """The snapshot a status document describes. SnapshotError naming the key when one
        is missing, unknown or of the wrong type (a daemon of another version, or not ipvslb)."""
        try:
            snap: StatusSnapshot = _codec(StatusSnapshot).load(doc)
        except _Bad as bad:
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in bad.path).removeprefix(".")
            raise SnapshotError(f"{where or 'the document'}: {bad.message}") from None
        return snap


# Keys left out of the document while they hold their default.
_OMITTED_AT_DEFAULT = {(BackendSnapshot, "connect_seconds"), (BackendSnapshot, "drained")}


class _Bad(Exception):
    """A bad value in a document, at `path` (keys and list indexes, outermost first)."""

    def __init__(self, path: list[str | int], message: str):
        self.path, self.message = path, message


class _Codec(NamedTuple):
    dump: Callable[[Any], Any]
    load: Callable[[object], Any]


def _identity(value: Any) -> Any:
    return value


@functools.cache
def _codec(hint: Any) -> _Codec:
    """How a value of the type `hint` goes to JSON and back; made once per type (a status
    document of 10 000 backends is read in a fraction of a second)."""
    State = _state_type()
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):   # X | None
        (inner,) = [a for a in args if a is not type(None)]
        some = _codec(inner)
        return _Codec(lambda v: None if v is None else some.dump(v),
                      lambda v: None if v is None else some.load(v))
    if dataclasses.is_dataclass(hint):
        return _dataclass_codec(hint)
    if hint is State:
        names = {str(s): s for s in State}

        def load_state(v: object) -> Any:
            if not isinstance(v, str) or v not in names:
                raise _Bad([], f"{_kind(v)} is not a health state")
            return names[v]
        return _Codec(str, load_state)
    if origin is tuple:
        if args[-1] is Ellipsis:
            return _sequence_codec(_codec(args[0]))
        return _pair_codec(tuple(_codec(a) for a in args))
    if origin is Mapping:
        item = _codec(args[1])

        def load_mapping(v: object) -> dict[str, Any]:
            if not isinstance(v, dict):
                raise _Bad([], f"expected an object, got {_kind(v)}")
            out = {}
            for k, x in v.items():
                try:
                    out[k] = item.load(x)
                except _Bad as bad:
                    bad.path.insert(0, k)
                    raise
            return out
        return _Codec(dict if item.dump is _identity else lambda v: {k: item.dump(x) for k, x in v.items()},
                      load_mapping)
    return _Codec(_identity, _scalar_loader(hint))


def _dataclass_codec(cls: Any) -> _Codec:
    hints = typing.get_type_hints(cls, localns={"State": _state_type()})
    fields = [(f.name, _codec(hints[f.name]), (cls, f.name) in _OMITTED_AT_DEFAULT, f.default)
              for f in dataclasses.fields(cls)]
    names = {f[0] for f in fields}

    def dump(obj: Any) -> dict[str, Any]:
        out = {}
        for name, codec, optional, default in fields:
            value = getattr(obj, name)
            if optional and value == default:
                continue
            out[name] = value if codec.dump is _identity else codec.dump(value)
        return out

    def load(doc: object) -> Any:
        if not isinstance(doc, dict):
            raise _Bad([], f"expected an object, got {_kind(doc)}")
        for key in doc:
            if key not in names:
                raise _Bad([key], "unknown key (a daemon of another version?)")
        values = {}
        for name, codec, optional, _ in fields:
            if name not in doc:
                if optional:
                    continue
                raise _Bad([name], "missing (a daemon of another version?)")
            try:
                values[name] = codec.load(doc[name])
            except _Bad as bad:
                bad.path.insert(0, name)
                raise
        return cls(**values)
    return _Codec(dump, load)


def _sequence_codec(item: _Codec) -> _Codec:
    def load(v: object) -> tuple:
        if not isinstance(v, list):
            raise _Bad([], f"expected a list, got {_kind(v)}")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(item.load(x))
            except _Bad as bad:
                bad.path.insert(0, i)
                raise
        return tuple(out)
    return _Codec(list if item.dump is _identity else lambda v: [item.dump(x) for x in v], load)


def _pair_codec(items: tuple[_Codec, ...]) -> _Codec:
    def load(v: object) -> tuple:
        if not isinstance(v, list):
            raise _Bad([], f"expected a list, got {_kind(v)}")
        if len(v) != len(items):
            raise _Bad([], f"expected {len(items)} items, got {len(v)}")
        out = []
        for i, (codec, x) in enumerate(zip(items, v, strict=True)):
            try:
                out.append(codec.load(x))
            except _Bad as bad:
                bad.path.insert(0, i)
                raise
        return tuple(out)
    return _Codec(lambda v: [c.dump(x) for c, x in zip(items, v, strict=True)], load)


def _scalar_loader(hint: Any) -> Callable[[object], Any]:
    # bool is an int to Python but not to the document; an int is a fine float.
    if hint is float:
        def load_float(v: object) -> float:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise _Bad([], f"expected float, got {_kind(v)}")
            return float(v)
        return load_float
    if hint not in (bool, int, str):   # pragma: no cover - a field type this module does not read
        raise TypeError(f"no reader for {hint!r}")

    def load(v: object) -> Any:
        if type(v) is not hint:
            raise _Bad([], f"expected {hint.__name__}, got {_kind(v)}")
        return v
    return load


def _state_type() -> type[State]:
    from ipvslb.health.states import State

    return State


def _kind(value: object) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"[:80]
