"""Fault injection for the Graph simulator: periodic and one-shot failures.

A :class:`FaultPlan` is consulted once per Graph request and once per ``$batch`` sub-request;
all periodic faults share one counter so that "every Nth request" means the same thing for each
kind. The simulator holds its lock while it asks, so a plan needs no lock of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# "no_next_link": the page is served without its @odata.nextLink, so the listing ends early
# without an error (a one-shot only). "drop_response": a write is applied and its response lost
# (the client sees a timeout, or the gateway's 504 in a $batch), so it cannot tell whether its
# create happened (a one-shot only, hitting writes alone).
FAULT_KINDS = frozenset(
    {"429", "503", "timeout", "malformed", "401", "410", "no_next_link", "drop_response"}
)
# Kinds a $batch sub-request can carry: its envelope is one JSON document, so a sub-response
# cannot be cut short, and a timeout shows as the gateway's 504.
SUB_REQUEST_KINDS = frozenset({"429", "503", "timeout", "401", "410", "drop_response"})
WRITE_ONLY_KINDS = frozenset({"drop_response"})


@dataclass
class _OneShot:
    path_substring: str
    kind: str
    remaining: int
    writes_only: bool = False


@dataclass
class FaultPlan:
    """What goes wrong, and how often. ``None`` disables a periodic fault."""

    throttle_every: int | None = None
    retry_after: str = "0.2"
    unavailable_every: int | None = None
    latency_s: float = 0.0
    timeout_every: int | None = None
    malformed_every: int | None = None
    foreign_next_link: bool = False
    _one_shots: list[_OneShot] = field(default_factory=list, repr=False)
    _seen: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        for name in ("throttle_every", "unavailable_every", "timeout_every", "malformed_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"FaultPlan.{name} must be a positive integer, not {value!r}")
        if self.latency_s < 0:
            raise ValueError("FaultPlan.latency_s must not be negative")

    def once(
        self, path_substring: str, kind: str, count: int = 1, *, writes_only: bool = False
    ) -> FaultPlan:
        """The next ``count`` requests whose path and query contain ``path_substring`` (and,
        with ``writes_only``, that write) fail with ``kind``. Returns the plan so calls can be
        chained."""
        if kind not in FAULT_KINDS:
            raise ValueError(
                f"unknown fault kind {kind!r} (one of {', '.join(sorted(FAULT_KINDS))})"
            )
        if count < 1:
            raise ValueError("a one-shot fault needs count >= 1")
        self._one_shots.append(_OneShot(path_substring, kind, count, writes_only))
        return self

    @property
    def pending_one_shots(self) -> int:
        return sum(s.remaining for s in self._one_shots)

    def decide(self, target: str, *, sub_request: bool = False, write: bool = False) -> str | None:
        """The fault kind for the next request to ``target`` (path and query), or None;
        ``write`` says the request writes (POST, PATCH, PUT or DELETE, not a $batch)."""
        allowed = SUB_REQUEST_KINDS if sub_request else FAULT_KINDS
        if not write:
            allowed = allowed - WRITE_ONLY_KINDS
        for shot in self._one_shots:
            if shot.writes_only and not write:
                continue
            if shot.remaining > 0 and shot.kind in allowed and shot.path_substring in target:
                shot.remaining -= 1
                self._one_shots = [s for s in self._one_shots if s.remaining > 0]
                return shot.kind
        self._seen += 1
        periodic = (
            ("429", self.throttle_every),
            ("503", self.unavailable_every),
            ("timeout", self.timeout_every),
            ("malformed", self.malformed_every),
        )
        for kind, every in periodic:
            if every is not None and kind in allowed and self._seen % every == 0:
                return kind
        return None
