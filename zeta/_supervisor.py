"""Supervision: restarts with backoff, marking models down, probing, and the periodic timers.

Each actor runs under :meth:`Supervisor.supervise` in the scheduler's task group. When its context
crashes or hangs, the request it was running and everything queued behind it are retried once on
another capable actor (a replica of the same model or another model), unless a stream already
delivered pieces; otherwise they fail with :class:`~zeta.ActorDead`. The context is then reopened
after an exponential backoff. More than ``max_restarts`` failures within ``window_s`` mark the
actor ``DOWN``: the router routes around it and a probe (reopen plus one tiny call) runs every
``probe_interval_s`` until one succeeds. An ``optional`` model whose file failed to load at startup
starts out down, probed the same way. Each replica is supervised on its own; a model is down when
all of its replicas are.

The same object runs the utilisation sampler and the calibration hook on their timers.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import anyio

from ._actor import ContextFailure, ModelActor
from ._calibration import CalibrationView, Calibrator
from ._exceptions import ActorDead, ConfigError, SchedulerClosed
from ._request import Request, RequestState
from ._router import Router
from ._snapshot import ActorState, SchedulerSnapshot
from .telemetry._logging import get_logger, redacting
from .telemetry._recorder import Recorder
from .telemetry._samplers import UtilisationSampler

__all__ = ["Supervision", "Supervisor"]

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Supervision:
    """How actors are restarted, marked down, probed and shut down.

    Args:
        max_restarts: failures tolerated within ``window_s``; one more marks the actor down.
        window_s: the sliding window for counting failures, seconds.
        backoff_initial_s: delay before the first restart; doubles with each failure in the window.
        backoff_max_s: the longest delay between restarts.
        probe_interval_s: time between probes of a down actor.
        hang_timeout_s: a call that makes no progress (no token) for this long is declared hung;
            ``None`` never gives up on a call.
        shutdown_timeout_s: how long closing the scheduler waits for running calls to finish and
            contexts to close before abandoning them.
    """

    max_restarts: int = 5
    window_s: float = 60.0
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 10.0
    probe_interval_s: float = 5.0
    hang_timeout_s: float | None = 120.0
    shutdown_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_restarts, bool)
            or not isinstance(self.max_restarts, int)
            or self.max_restarts < 0
        ):
            raise ConfigError(
                f"must be an integer >= 0, got {self.max_restarts!r}", key="max_restarts"
            )
        for key in (
            "window_s",
            "backoff_initial_s",
            "backoff_max_s",
            "probe_interval_s",
            "shutdown_timeout_s",
        ):
            _positive(key, getattr(self, key), allow_zero=key != "window_s")
        if self.hang_timeout_s is not None:
            _positive("hang_timeout_s", self.hang_timeout_s)
        if self.backoff_max_s < self.backoff_initial_s:
            raise ConfigError("must be >= backoff_initial_s", key="backoff_max_s")


def _positive(key: str, value: object, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):  # type: ignore[operator]
        raise ConfigError(
            f"must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}", key=key
        )


class Supervisor:
    """Runs actors with restarts and the sampler and calibration timers."""

    def __init__(
        self,
        actors: Sequence[ModelActor],
        router: Router,
        config: Supervision,
        *,
        recorder: Recorder,
        clock: Callable[[], float],
        snapshot: Callable[[], SchedulerSnapshot],
        sampler: UtilisationSampler | None,
        sample_interval: float,
        calibrator: Calibrator | None,
        calibration_interval: float,
    ) -> None:
        self._actors = tuple(actors)
        self._router = router
        self.config = config
        self._recorder = recorder
        self._clock = clock
        self._snapshot = snapshot
        self._sampler = sampler
        self._sample_interval = sample_interval
        self._calibrator = calibrator
        self._calibration_interval = calibration_interval
        self._stop: anyio.Event | None = None
        self.calibration_runs = 0

    def start(self) -> None:
        """Bind to the running event loop."""
        self._stop = anyio.Event()

    def stop(self) -> None:
        """Ask every actor to stop restarting or probing (the scheduler is closing)."""
        if self._stop is not None:
            self._stop.set()

    async def _pause(self, seconds: float) -> bool:
        """Sleep ``seconds`` or until stopped; ``True`` if stopped."""
        assert self._stop is not None
        with anyio.move_on_after(seconds):
            await self._stop.wait()
        return self._stop.is_set()

    # -- actors -----------------------------------------------------------------------------
    async def supervise(self, actor: ModelActor, loaded: bool = True) -> None:
        """Serve ``actor`` until the scheduler closes, restarting its context when it breaks.

        ``loaded=False``: its context failed to open at startup (an optional model); it is
        ``DOWN`` and probed until it opens, then served.
        """
        failures: deque[float] = deque()
        try:
            if not loaded and not await self._recover(actor):
                return
            while True:
                try:
                    await actor.serve()
                except ContextFailure as failure:
                    self._fail_over(actor, failure)
                else:
                    # The mailbox was closed and is empty: close the context and finish.
                    await actor.close()
                    return
                if not await self._restart(actor, failures):
                    return
        finally:
            request = actor.current
            actor.current = None
            if request is not None:
                request.finish(error=SchedulerClosed("the scheduler closed while the request ran"))
            actor.retire_context()
            actor.set_state(ActorState.STOPPED)
            actor.finished.set()

    def _fail_over(self, actor: ModelActor, failure: ContextFailure) -> None:
        """Mark the actor unavailable and move its requests elsewhere (or fail them)."""
        actor.set_state(ActorState.RESTARTING)
        actor.current = None
        actor.retire_context()
        request = failure.request
        what = "hung" if failure.hung else "crashed"
        prompt = request.params.prompt if request is not None and request.params is not None else ""
        with redacting(prompt):
            log.warning(
                "actor_failed",
                model=actor.name,
                replica=actor.replica,
                hung=failure.hung,
                error=None if failure.error is None else repr(failure.error),
                request_id=None if request is None else request.id,
            )
        victims: list[Request] = []
        # A request whose caller already left (cancelled, expired) stays settled: never rerun it.
        if request is not None and not request.done:
            request.state = RequestState.NEW
            victims.append(request)
        victims.extend(actor.drain())
        for victim in victims:
            if not self.redispatch(victim):
                error = ActorDead(
                    f"model {actor.name!r} (replica {actor.replica}) {what} and no other capable "
                    f"model could take request {victim.id}"
                )
                error.__cause__ = failure.error
                victim.finish(error=error)

    def redispatch(self, request: Request) -> bool:
        """Retry a request off a failed actor, once, unless it already streamed pieces."""
        if request.streamed or request.attempts >= 2:
            return False
        router = self._router
        try:
            i = router.choose(request.route)
        except Exception:  # a buggy user policy must not lose the request (or the actor)
            i = None
        if i is None:
            i = router.fallback(request.route)
        if i is None:
            return False
        return self._actors[i].enqueue(request, self._clock())

    async def _restart(self, actor: ModelActor, failures: deque[float]) -> bool:
        """Restart (or mark down and probe) until the actor is ready; ``False`` if stopping."""
        cfg = self.config
        while True:
            now = self._clock()
            failures.append(now)
            while failures and failures[0] < now - cfg.window_s:
                failures.popleft()
            actor.restarts += 1
            self._recorder.restarted(actor.name)
            if len(failures) > cfg.max_restarts:
                actor.set_state(ActorState.DOWN)
                log.error(
                    "actor_down",
                    model=actor.name,
                    replica=actor.replica,
                    failures=len(failures),
                    window_s=cfg.window_s,
                )
                if not await self._recover(actor):
                    return False
                failures.clear()
                return True
            actor.set_state(ActorState.RESTARTING)
            backoff = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** (len(failures) - 1))
            if await self._pause(backoff):
                return False
            try:
                await actor.open()
            except Exception as exc:
                log.warning(
                    "actor_restart_failed", model=actor.name, replica=actor.replica, error=repr(exc)
                )
                continue
            actor.set_state(ActorState.READY)
            log.warning(
                "actor_restarted",
                model=actor.name,
                replica=actor.replica,
                restarts=actor.restarts,
                backoff_s=backoff,
            )
            return True

    async def _recover(self, actor: ModelActor) -> bool:
        """Probe a down actor every ``probe_interval_s`` until a probe succeeds, then mark it
        ready; ``False`` if the scheduler closes first."""
        while True:
            if await self._pause(self.config.probe_interval_s):
                return False
            if await self._probe(actor):
                actor.set_state(ActorState.READY)
                log.warning("actor_recovered", model=actor.name, replica=actor.replica)
                return True

    async def _probe(self, actor: ModelActor) -> bool:
        try:
            await actor.open()
            await actor.probe()
        except Exception as exc:
            actor.retire_context()
            log.info("actor_probe_failed", model=actor.name, replica=actor.replica, error=repr(exc))
            return False
        return True

    # -- timers -----------------------------------------------------------------------------
    async def watch_hangs(self) -> None:
        """Give up on calls that made no progress for ``hang_timeout_s`` (checked 8 times per
        timeout, so a hang is detected between 1 and 1.125 timeouts after its last token)."""
        timeout = self.config.hang_timeout_s
        if timeout is None:
            return
        while True:
            await anyio.sleep(timeout / 8)
            now = self._clock()
            for actor in self._actors:
                actor.check_hung(now, timeout)

    def sample_once(self) -> None:
        """Read utilisation for every actor and write it into the kernel's util column.

        Samplers run on the event loop and must be quick (NVML reads and busy fractions are).
        """
        if self._sampler is None:
            return
        actors = self._actors
        snapshots = [a.snapshot() for a in actors]
        try:
            readings = list(self._sampler.sample(snapshots, self._clock()))
            if len(readings) != len(actors):
                raise ValueError(
                    f"sampler returned {len(readings)} readings for {len(actors)} actors"
                )
        except Exception as exc:
            log.warning("sample_failed", error=repr(exc))
            return
        table = self._router.table
        for actor, value in zip(actors, readings, strict=True):
            if isinstance(value, (int, float)) and math.isfinite(value):
                table.set_util(actor.index, min(1.0, max(0.0, float(value))))

    async def sample_forever(self) -> None:
        if self._sampler is None:
            return
        while True:
            await anyio.sleep(self._sample_interval)
            self.sample_once()

    async def calibrate_once(self) -> Mapping[str, float] | None:
        """Run the calibrator once and apply what it proposes; return what was applied.

        Raises:
            ConfigError: the calibrator proposed an unknown parameter or an invalid value.
        """
        if self._calibrator is None:
            return None
        view = CalibrationView(
            snapshot=self._snapshot(),
            history=self._recorder.snapshot(),
            params=self._router.params(),
            run=self.calibration_runs,
        )
        proposed = await self._calibrator.calibrate(view)
        self.calibration_runs += 1
        applied = self._router.apply_params(proposed) if proposed is not None else {}
        params = self._router.params()
        self._recorder.calibrated(params)
        log.info("calibrated", run=self.calibration_runs, changed=sorted(applied), **params)
        return applied

    async def calibrate_forever(self) -> None:
        if self._calibrator is None:
            return
        while True:
            await anyio.sleep(self._calibration_interval)
            try:
                await self.calibrate_once()
            except Exception as exc:
                log.warning("calibration_failed", error=repr(exc))
