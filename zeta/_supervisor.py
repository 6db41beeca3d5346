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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio
from anyio.abc import TaskGroup

from ._actor import ContextFailure, ModelActor
from ._calibration import (
    CalibrationDecision,
    CalibrationReport,
    CalibrationView,
    Calibrator,
    SampleLog,
    apply_decision,
)
from ._exceptions import ActorDead, ConfigError, ModelLoadError, SchedulerClosed
from ._request import Request, RequestState
from ._router import Router
from ._snapshot import ActorState, SchedulerSnapshot
from ._types import ModelSpec, check_int, check_number
from .backends._base import CompletionParams
from .telemetry._logging import get_logger, redacting
from .telemetry._recorder import Recorder
from .telemetry._samplers import UtilisationSampler

__all__ = ["Supervision", "Supervisor"]

log = get_logger(__name__)


#: The longest any of :class:`Supervision`'s durations may be, in seconds (about 11.6 days):
#: far beyond a useful setting, and small enough for every timer and deadline to stay finite.
MAX_SUPERVISION_S = 1e6

#: The most failures :class:`Supervision` may tolerate in its window; with it the doubled
#: backoff (``backoff_initial_s * 2 ** failures``) stays a finite float.
MAX_RESTARTS = 1000


@dataclass(frozen=True, slots=True)
class Supervision:
    """How actors are restarted, marked down, probed and shut down.

    Validates itself: a bad value raises :class:`~zeta.ConfigError` naming the field. Durations
    are finite numbers of seconds up to :data:`MAX_SUPERVISION_S` (1e6).

    Args:
        max_restarts: failures tolerated within ``window_s``; one more marks the actor down.
            0 to :data:`MAX_RESTARTS` (1000).
        window_s: the sliding window for counting failures, seconds; ``> 0``.
        backoff_initial_s: delay before the first restart; doubles with each failure in the
            window. ``>= 0``.
        backoff_max_s: the longest delay between restarts; ``>= backoff_initial_s``.
        probe_interval_s: time between probes of a down actor; ``>= 0``.
        hang_timeout_s: a call that makes no progress (no token) for this long is declared hung;
            ``> 0``, or ``None`` never to give up on a call.
        shutdown_timeout_s: how long closing the scheduler waits for running calls to finish and
            contexts to close before abandoning them; ``>= 0``.
    """

    max_restarts: int = 5
    window_s: float = 60.0
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 10.0
    probe_interval_s: float = 5.0
    hang_timeout_s: float | None = 120.0
    shutdown_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        check_int(self.max_restarts, "max_restarts", 0, MAX_RESTARTS)
        for key in (
            "window_s",
            "backoff_initial_s",
            "backoff_max_s",
            "probe_interval_s",
            "hang_timeout_s",
            "shutdown_timeout_s",
        ):
            value = getattr(self, key)
            if not (key == "hang_timeout_s" and value is None):
                positive = key in ("window_s", "hang_timeout_s")
                seconds = check_number(value, key, 0.0, MAX_SUPERVISION_S, low_open=positive)
                object.__setattr__(self, key, seconds)
        if self.backoff_max_s < self.backoff_initial_s:
            raise ConfigError(
                f"must be >= backoff_initial_s ({self.backoff_initial_s:g}), "
                f"got {self.backoff_max_s:g}",
                key="backoff_max_s",
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
        samples: SampleLog | None = None,
        models: Sequence[ModelSpec] = (),
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
        self._samples = samples
        self._models = tuple(models)
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

    async def open_all(self) -> set[ModelActor]:
        """Open every context concurrently (each on its own worker).

        Returns the actors of ``optional`` models whose file failed to load, after one
        ``model_load_failed`` warning per such model.

        Raises:
            ModelLoadError: a model that is not optional failed to load, or every actor did.
            Exception: any other failure to open a context (a backend bug is not a bad file).
        """
        jobs = [(actor, actor.begin_open()) for actor in self._actors]
        failed: dict[str, tuple[ModelLoadError, list[ModelActor]]] = {}
        try:
            for actor, job in jobs:
                try:
                    await actor.finish_open(job)
                except ModelLoadError as exc:
                    if not actor.spec.optional:
                        raise
                    failed.setdefault(actor.name, (exc, []))[1].append(actor)
            unloaded = {actor for _, actors in failed.values() for actor in actors}
            if len(unloaded) == len(self._actors):
                raise next(iter(failed.values()))[0]
        except BaseException:
            # Let the contexts that are still opening finish and close (bounded), so no thread of
            # a failed startup is still loading weights when the error reaches the caller.
            closing = [c for a in self._actors if (c := a.retire_context()) is not None]
            with anyio.move_on_after(self.config.shutdown_timeout_s, shield=True):
                for close in closing:
                    await close.wait()
            raise
        for name, (error, actors) in failed.items():
            log.warning(
                "model_load_failed",
                model=name,
                path=error.path if error.path is not None else actors[0].spec.path,
                replicas=[a.replica for a in actors],
                error=str(error),
            )
        return unloaded

    def serve_all(self, tg: TaskGroup, unloaded: set[ModelActor]) -> None:
        """Mark the actors ready (``unloaded`` ones down) and start, in ``tg``, a supervising
        task per actor and the sampler, calibration and hang-watch timers."""
        for actor in self._actors:
            loaded = actor not in unloaded
            actor.set_state(ActorState.READY if loaded else ActorState.DOWN)
            tg.start_soon(
                self.supervise, actor, loaded, name=f"zeta actor {actor.name}[{actor.replica}]"
            )
        tg.start_soon(self.sample_forever, name="zeta sampler")
        tg.start_soon(self.calibrate_forever, name="zeta calibration")
        tg.start_soon(self.watch_hangs, name="zeta hang watchdog")

    async def shut_down(self) -> None:
        """Fail what is queued, stop restarting, and let running calls finish (bounded by
        ``shutdown_timeout_s``)."""
        for actor in self._actors:
            for request in actor.close_mailbox():
                request.finish(error=SchedulerClosed("the scheduler closed before the request ran"))
        self.stop()
        with anyio.move_on_after(self.config.shutdown_timeout_s):
            for actor in self._actors:
                await actor.finished.wait()

    def release(self, *, close_sampler: bool) -> None:
        """Give up every context and mark every actor stopped; close the sampler if asked (it
        releases NVML if the default sampler opened it)."""
        for actor in self._actors:
            actor.retire_context()
            actor.set_state(ActorState.STOPPED)
        close = getattr(self._sampler, "close", None)
        if close_sampler and callable(close):
            try:
                close()
            except Exception as exc:
                log.warning("sampler_close_failed", error=repr(exc))

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
            running = list(actor.running.values())
            actor.running.clear()
            for request in running:
                request.finish(error=SchedulerClosed("the scheduler closed while the request ran"))
            actor.retire_context()
            actor.set_state(ActorState.STOPPED)
            actor.finished.set()

    def _fail_over(self, actor: ModelActor, failure: ContextFailure) -> None:
        """Mark the actor unavailable and move its requests elsewhere (or fail them)."""
        actor.set_state(ActorState.RESTARTING)
        actor.running.clear()
        actor.retire_context()
        what = "hung" if failure.hung else "crashed"
        secrets: list[str] = []
        for request in failure.requests:
            payload = request.payload
            if isinstance(payload, CompletionParams):
                secrets.append(payload.prompt)
            else:
                secrets.extend(payload.texts)
        with redacting(*secrets):
            log.warning(
                "actor_failed",
                model=actor.name,
                replica=actor.replica,
                hung=failure.hung,
                error=None if failure.error is None else repr(failure.error),
                request_ids=[r.id for r in failure.requests],
            )
        victims: list[Request] = []
        # A request whose caller already left (cancelled, expired) stays settled: never rerun it.
        for request in failure.requests:
            if not request.done:
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

    async def calibrate_once(self) -> CalibrationReport | None:
        """Run the calibrator once and apply what it decides; return the run's report (a
        mapping of the parameters it changed, with the run's details), or ``None`` without a
        calibrator. The calibrator does its own heavy work off the event loop; applying the
        decision to the router and the kernel happens here, on it.

        Raises:
            ConfigError: the calibrator proposed an unknown parameter or an invalid value
                (nothing was changed).
        """
        if self._calibrator is None:
            return None
        now = self._clock()
        view = CalibrationView(
            snapshot=self._snapshot(),
            history=self._recorder.snapshot(),
            params=self._router.scoring.as_dict(),
            run=self.calibration_runs,
            samples=tuple(self._samples.since(-math.inf)) if self._samples is not None else (),
            models=self._models,
            now=now,
        )
        proposed = await self._calibrator.calibrate(view)
        self.calibration_runs += 1
        applied = apply_decision(self._router, proposed, self._clock())
        params = self._router.scoring.as_dict()
        self._recorder.calibrated(params)
        decision = proposed if isinstance(proposed, CalibrationDecision) else None
        report = CalibrationReport(
            applied, run=self.calibration_runs, params=params, decision=decision
        )
        log.info("calibration_finished", **report.log_fields())
        return report

    async def calibrate_forever(self) -> None:
        if self._calibrator is None:
            return
        while True:
            await anyio.sleep(self._calibration_interval)
            try:
                await self.calibrate_once()
            except Exception as exc:
                log.warning("calibration_failed", error=repr(exc))
