"""Read-only views of scheduler state, for callers, telemetry and calibration."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ActorState(enum.StrEnum):
    """Lifecycle of one model actor (one context)."""

    STARTING = "starting"  # loading the model
    READY = "ready"  # serving its mailbox
    RESTARTING = "restarting"  # failed, waiting out its backoff
    DOWN = "down"  # too many restarts; routed around until a probe succeeds
    STOPPED = "stopped"  # scheduler shut down


@dataclass(frozen=True, slots=True)
class ModelSnapshot:
    """State of one actor (one replica of one model) at one instant.

    ``busy_s`` is the cumulative time spent inside inference calls since the actor was created;
    the busy-fraction sampler derives CPU-model utilisation from its rate of change.

    Batching: ``in_flight`` requests occupy ``in_flight`` of the context's ``slots``.
    ``steps_by_occupancy[k - 1]`` counts the decode steps run with ``k`` sequences in the batch;
    ``generated_tokens`` counts completion tokens of finished requests; ``prefix_hits`` and
    ``prefix_tokens_reused`` count admissions that reused a prompt prefix already in the KV cache
    and the prompt tokens they did not have to prefill (backends that cache prefixes only).
    """

    name: str
    replica: int
    device: int | None
    state: ActorState
    queue_len: int
    in_flight: int
    ewma_request_s: float
    ewma_token_s: float
    utilisation: float
    busy_s: float
    restarts: int
    completed: int
    failed: int
    slots: int = 1
    generated_tokens: int = 0
    steps_by_occupancy: tuple[int, ...] = ()
    prefix_hits: int = 0
    prefix_tokens_reused: int = 0


@dataclass(frozen=True, slots=True)
class SchedulerSnapshot:
    """All actors' snapshots plus the time (monotonic seconds) they were taken."""

    at: float
    models: tuple[ModelSnapshot, ...]

    def by_model(self, name: str) -> tuple[ModelSnapshot, ...]:
        return tuple(m for m in self.models if m.name == name)
