"""The public :class:`Scheduler`: admission, the async request API and the runtime's lifecycle.

A request's path: validate and classify (``kind="auto"``), ask the router for an actor, queue it
in that actor's mailbox (or wait for room, or refuse with :class:`~zeta.Overloaded`), then wait for
the actor to settle it. The caller's task is the one place a request's outcome is recorded, so
every request is counted exactly once: as a result, as one typed error, or as cancelled.
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus

from ._actor import LoopHandle, ModelActor, ThreadWorker, ToThreadWorker, Worker
from ._calibration import Calibrator
from ._classifier import Classifier, HeuristicClassifier
from ._config import Config, MetricsConfig, load_config
from ._exceptions import (
    ConfigError,
    DeadlineExceeded,
    InvalidInputError,
    InvalidRequestError,
    ModelLoadError,
    ModelUnavailable,
    NoCapableModelError,
    Overloaded,
    SchedulerClosed,
    TryAgainError,
)
from ._mailbox import EventLike
from ._policies import Policy, RouteRequest, make_policy
from ._request import CompletionResult, EmbeddingResult, Op, Request, RequestState
from ._router import Router, build_candidates
from ._snapshot import ActorState, SchedulerSnapshot
from ._supervisor import Supervision, Supervisor
from ._types import KIND_INDEX, SERVED_KINDS, Kind, ModelSpec, Priority
from .backends import get_backend
from .backends._base import BackendFactory, CompletionParams
from .telemetry._logging import get_logger
from .telemetry._recorder import Outcome, Recorder, outcome_of
from .telemetry._samplers import UtilisationSampler

if TYPE_CHECKING:
    from .telemetry._server import MetricsServer

__all__ = ["Scheduler", "TokenStream"]

log = get_logger(__name__)
_stdlib_log = logging.getLogger(__name__)


class _Default(enum.Enum):
    TOKEN = 0


#: "Use the scheduler's default" for per-call ``admission_timeout``.
DEFAULT: Final = _Default.TOKEN


class _Phase(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class _RoomWaiter:
    """A request waiting for mailbox room: set ``event`` once it was placed (or must give up)."""

    __slots__ = ("error", "event")

    def __init__(self, event: EventLike) -> None:
        self.event = event
        self.error: Exception | None = None


def _outcome_of(exc: BaseException, cancelled: type[BaseException]) -> Outcome:
    return Outcome.CANCELLED if isinstance(exc, cancelled) else outcome_of(exc)


def _non_negative(
    key: str, value: object, *, allow_none: bool = False, allow_inf: bool = False
) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if not ok or value < 0 or (math.isinf(value) and not allow_inf):  # type: ignore[arg-type,operator]
        raise ConfigError(f"must be a number >= 0, got {value!r}", key=key)


class Scheduler:
    """Schedules completion and embedding requests across local models, by live load.

    Use it as an async context manager, which runs it in its own task group::

        async with Scheduler(models=[coder, reasoner, embedder], policy="dynamic") as zs:
            result = await zs.complete("Write a haiku about queues", max_tokens=64)

    or run it inside an application's task group (``run`` returns when :meth:`aclose` is called
    or the task group is cancelled, after a graceful shutdown)::

        async with anyio.create_task_group() as tg:
            zs = await tg.start(Scheduler(models=[...]).run)
            ...
            await zs.aclose()

    Every request ends exactly once: with a result, with one typed :class:`~zeta.ZetaError`, or
    with the caller's own cancellation. :class:`~zeta.TryAgainError` subclasses (overloaded, model
    unavailable, actor dead, deadline exceeded) mean "retry later";
    :class:`~zeta.InvalidInputError` subclasses mean "the request is wrong".

    A model whose file fails to load stops the scheduler starting with
    :class:`~zeta.ModelLoadError`, unless its spec is ``optional``: then it starts without it
    (one ``model_load_failed`` warning), the model's actors show as ``DOWN`` and are probed until
    the file loads, and a request that only that model could serve fails with
    :class:`~zeta.ModelUnavailable`.

    Args:
        models: the models to schedule onto; each replica becomes one actor.
        policy: a policy name (``"dynamic"``, ``"static"``, ``"threshold"``, ``"round_robin"``,
            ``"jsq"``, ``"p2c"``, ``"peak_ewma"``) or a :class:`~zeta.Policy` object.
        classifier: classifies ``kind="auto"`` prompts; default :class:`~zeta.HeuristicClassifier`.
        mailbox_capacity: most requests queued per actor.
        admission_timeout: default for how long a request waits for mailbox room when every
            capable actor is full: ``0`` refuses at once with :class:`~zeta.Overloaded`, ``None``
            waits until the request's deadline. Waiting requests of one kind are admitted in
            arrival order as room appears.
        aging_s: seconds of queueing that raise a request by one priority class.
        backend_factory: opens contexts for every model; default: the backend each
            :attr:`ModelSpec.backend <zeta.ModelSpec.backend>` names.
        worker: ``"thread"`` (one dedicated thread per context, the default) or ``"to_thread"``
            (``anyio.to_thread.run_sync`` behind a per-context ``CapacityLimiter(1)``).
        supervision: restart, probe, hang and shutdown settings.
        sampler: utilisation sampler run every ``sample_interval`` seconds; default the telemetry
            package's ``DeviceSampler`` (NVML for GPU-placed models, host CPU utilisation for the rest).
        calibrator: calibration hook run every ``calibration_interval`` seconds.
        recorder: where request counts and latencies go; default a new
            :class:`~zeta.telemetry.Recorder` (``zs.recorder``).
        tau, contention_weight, spill_penalty, quality_penalty: scoring-kernel parameters
            (peak-EWMA time constant; weight of utilisation; seconds added for a non-preferred
            kind; seconds added per quality rank).
        seed: seeds tie-breaking and randomised policies.
        clock: monotonic seconds; deadlines are absolute times on this clock
            (``time.monotonic``, which is also asyncio's loop clock).
    """

    def __init__(
        self,
        models: Sequence[ModelSpec],
        *,
        policy: str | Policy = "dynamic",
        classifier: Classifier | None = None,
        mailbox_capacity: int = 64,
        admission_timeout: float | None = 0.0,
        aging_s: float = 10.0,
        backend_factory: BackendFactory | None = None,
        worker: Literal["thread", "to_thread"] = "thread",
        supervision: Supervision | None = None,
        sampler: UtilisationSampler | None = None,
        sample_interval: float = 0.5,
        calibrator: Calibrator | None = None,
        calibration_interval: float = 60.0,
        recorder: Recorder | None = None,
        tau: float = 5.0,
        contention_weight: float = 1.0,
        spill_penalty: float = 1.0,
        quality_penalty: float = 0.25,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        models = tuple(models)
        if not models:
            raise ConfigError("at least one model is needed", key="models")
        for spec in models:
            if not isinstance(spec, ModelSpec):
                raise ConfigError(f"expected ModelSpec objects, got {spec!r}", key="models")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ConfigError(f"model names must be unique, repeated: {dupes}", key="models")
        if (
            isinstance(mailbox_capacity, bool)
            or not isinstance(mailbox_capacity, int)
            or mailbox_capacity < 1
        ):
            raise ConfigError(
                f"must be an integer >= 1, got {mailbox_capacity!r}", key="mailbox_capacity"
            )
        _non_negative("admission_timeout", admission_timeout, allow_none=True, allow_inf=True)
        _non_negative("aging_s", aging_s, allow_inf=True)
        if aging_s == 0:
            raise ConfigError("must be > 0 (math.inf disables aging)", key="aging_s")
        for key, value in (
            ("sample_interval", sample_interval),
            ("calibration_interval", calibration_interval),
        ):
            _non_negative(key, value)
            if value == 0:
                raise ConfigError("must be > 0", key=key)
        if worker not in ("thread", "to_thread"):
            raise ConfigError(f"must be 'thread' or 'to_thread', got {worker!r}", key="worker")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"must be an integer >= 0, got {seed!r}", key="seed")

        self._models = models
        self._policy = make_policy(policy, seed=seed)
        self._classifier: Classifier = (
            classifier if classifier is not None else HeuristicClassifier()
        )
        self._admission_timeout = admission_timeout
        self._worker_kind = worker
        self._supervision = supervision if supervision is not None else Supervision()
        self._clock = clock
        self.recorder = recorder if recorder is not None else Recorder()
        self._owns_sampler = sampler is None
        if sampler is None:
            from .telemetry._samplers import DeviceSampler

            sampler = DeviceSampler()
        self.sampler: UtilisationSampler = sampler
        factories = {m.name: backend_factory or get_backend(m.backend) for m in models}

        self._router = Router(
            build_candidates(models, mailbox_capacity),
            self._policy,
            seed=seed,
            tau=tau,
            contention_weight=contention_weight,
            spill_penalty=spill_penalty,
            quality_penalty=quality_penalty,
        )
        specs = {m.name: m for m in models}
        self._actors: tuple[ModelActor, ...] = tuple(
            ModelActor(
                specs[c.model],
                c.replica,
                c.index,
                table=self._router.table,
                factory=factories[c.model],
                capacity=mailbox_capacity,
                aging_s=aging_s,
                clock=clock,
                on_capacity=self._notify_capacity,
            )
            for c in self._router.candidates
        )
        self._supervisor = Supervisor(
            self._actors,
            self._router,
            self._supervision,
            recorder=self.recorder,
            clock=clock,
            snapshot=self.snapshot,
            sampler=sampler,
            sample_interval=sample_interval,
            calibrator=calibrator,
            calibration_interval=calibration_interval,
        )
        self._ids = itertools.count(1)
        # What an auto request classified as each kind is served as: the kind itself if some
        # model serves it, else the first served text kind ("auto" means "you decide").
        capable = self._router.capable
        text_kinds = [k for k in (Kind.SIMPLE, Kind.CODE, Kind.REASON) if capable[k]]
        self._auto_kinds: dict[Kind, Kind] = {
            k: k if capable[k] else (text_kinds[0] if text_kinds else Kind.SIMPLE)
            for k in (Kind.SIMPLE, Kind.CODE, Kind.REASON)
        }
        self._phase = _Phase.NEW
        self._handle: LoopHandle | None = None
        self._cancelled: type[BaseException] = BaseException
        self._new_event: Callable[[], EventLike] = anyio.Event
        #: Requests waiting for mailbox room, per kind, oldest first (see _notify_capacity).
        self._waiting: dict[Kind, OrderedDict[Request, _RoomWaiter]] = {
            k: OrderedDict() for k in SERVED_KINDS
        }
        self._closing: anyio.Event | None = None
        self._stopped: anyio.Event | None = None
        self._close_requested = False
        self._stack: AsyncExitStack | None = None
        self._metrics_config: MetricsConfig | None = None
        #: The metrics endpoint :meth:`from_config` asked for, while the scheduler runs.
        self.metrics_server: MetricsServer | None = None

    @classmethod
    def from_config(cls, config: Config | str | os.PathLike[str], **overrides: Any) -> Scheduler:
        """A scheduler as a config file (or a loaded :class:`~zeta.Config`) describes it::

            async with Scheduler.from_config("zeta.toml") as zs:
                ...

        Models (``optional`` ones included), policy and its parameters, and mailbox capacity
        come from the config; ``overrides`` are further keyword arguments of the constructor,
        and win over the config's. If the config's ``[metrics]`` is enabled, the scheduler
        serves Prometheus metrics there while it runs (:attr:`metrics_server`).

        Raises:
            ConfigError: the file is missing or invalid (the message names the key).
        """
        if not isinstance(config, Config):
            config = load_config(config)
        scheduler = cls(**{**config.scheduler_kwargs(), **overrides})
        if config.metrics.enabled:
            scheduler._metrics_config = config.metrics
        return scheduler

    # -- introspection ----------------------------------------------------------------------
    @property
    def models(self) -> tuple[ModelSpec, ...]:
        return self._models

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def running(self) -> bool:
        """Whether requests are being admitted."""
        return self._phase is _Phase.RUNNING

    def clock(self) -> float:
        """The scheduler's clock; ``deadline=`` arguments are absolute times on it."""
        return self._clock()

    def snapshot(self) -> SchedulerSnapshot:
        """Every actor's state now (callable from any thread, e.g. a metrics scrape)."""
        return SchedulerSnapshot(at=self._clock(), models=tuple(a.snapshot() for a in self._actors))

    def __repr__(self) -> str:
        names = [m.name for m in self._models]
        policy = getattr(self._policy, "name", self._policy)
        return f"<Scheduler {self._phase.value} models={names} policy={policy!r}>"

    # -- lifecycle --------------------------------------------------------------------------
    async def __aenter__(self) -> Scheduler:
        stack = AsyncExitStack()
        tg = await stack.enter_async_context(anyio.create_task_group())
        try:
            await tg.start(self.run)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        self.close()
        if stack is not None:
            # The body's own exception propagates as is; it is not the task group's business.
            await stack.__aexit__(None, None, None)

    async def run(self, *, task_status: TaskStatus[Scheduler] = anyio.TASK_STATUS_IGNORED) -> None:
        """Open every context, serve until :meth:`close`, then shut down gracefully.

        Reports ``self`` to ``task_status`` once every model is loaded (or, for an ``optional``
        one, has failed to) and requests are admitted.

        Raises:
            ModelLoadError: a model that is not optional could not be opened, or no model could
                (nothing is left running).
            OSError: the metrics endpoint :meth:`from_config` asked for could not bind.
            RuntimeError: the scheduler already ran.
        """
        if self._phase is not _Phase.NEW:
            raise RuntimeError("a Scheduler runs once; create a new one")
        self._phase = _Phase.STARTING
        handle = self._handle = LoopHandle.current()
        self._new_event = handle.new_event
        self._cancelled = anyio.get_cancelled_exc_class()
        self._closing = anyio.Event()
        self._stopped = anyio.Event()
        if self._close_requested:
            self._closing.set()
        self._supervisor.start()
        startup_error: Exception | None = None
        try:
            if self._metrics_config is not None:  # bind first: a taken port fails fast
                from .telemetry._server import serve_metrics

                m = self._metrics_config
                self.metrics_server = serve_metrics(self, m.host, m.port)
            async with anyio.create_task_group() as tg:
                make_worker: Callable[[str], Worker]
                if self._worker_kind == "thread":
                    make_worker = lambda name: ThreadWorker(name, handle)  # noqa: E731
                else:
                    make_worker = lambda name: ToThreadWorker(tg, handle)  # noqa: E731
                for actor in self._actors:
                    actor.configure(handle, make_worker)
                try:
                    unloaded = await self._open_all()
                except Exception as exc:
                    startup_error = exc
                    tg.cancel_scope.cancel()
                else:
                    for actor in self._actors:
                        loaded = actor not in unloaded
                        actor.set_state(ActorState.READY if loaded else ActorState.DOWN)
                        tg.start_soon(
                            self._supervisor.supervise,
                            actor,
                            loaded,
                            name=f"zeta actor {actor.name}[{actor.replica}]",
                        )
                    tg.start_soon(self._supervisor.sample_forever, name="zeta sampler")
                    tg.start_soon(self._supervisor.calibrate_forever, name="zeta calibration")
                    tg.start_soon(self._supervisor.watch_hangs, name="zeta hang watchdog")
                    self._phase = _Phase.RUNNING
                    task_status.started(self)
                    try:
                        await self._closing.wait()
                    finally:
                        with anyio.CancelScope(shield=True):
                            await self._teardown()
                        tg.cancel_scope.cancel()
        finally:
            self._phase = _Phase.CLOSED
            for actor in self._actors:
                actor.retire_context()
                actor.set_state(ActorState.STOPPED)
            close_sampler = getattr(self.sampler, "close", None)
            if self._owns_sampler and callable(close_sampler):
                try:
                    close_sampler()  # releases NVML if the default sampler opened it
                except Exception as exc:
                    log.warning("sampler_close_failed", error=repr(exc))
            server, self.metrics_server = self.metrics_server, None
            if server is not None:
                with anyio.CancelScope(shield=True):
                    await server.aclose()
            self._stopped.set()
        if startup_error is not None:
            raise startup_error

    async def _open_all(self) -> set[ModelActor]:
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
            with anyio.move_on_after(self._supervision.shutdown_timeout_s, shield=True):
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

    async def _teardown(self) -> None:
        """Refuse new work, fail what is queued, let running calls finish (bounded), close contexts."""
        self._phase = _Phase.CLOSING
        self._release_waiters()
        for actor in self._actors:
            for request in actor.close_mailbox():
                request.finish(error=SchedulerClosed("the scheduler closed before the request ran"))
        self._supervisor.stop()
        with anyio.move_on_after(self._supervision.shutdown_timeout_s):
            for actor in self._actors:
                await actor.finished.wait()

    def close(self) -> None:
        """Start a graceful shutdown; :meth:`run` returns once it is done. Idempotent."""
        self._close_requested = True
        if self._closing is not None:
            self._closing.set()

    async def aclose(self) -> None:
        """Shut down and wait until every actor has stopped."""
        self.close()
        if self._stopped is not None:
            await self._stopped.wait()
        else:
            await anyio.lowlevel.checkpoint()

    # -- the request API --------------------------------------------------------------------
    async def complete(
        self,
        prompt: str,
        *,
        kind: Kind | str = Kind.AUTO,
        max_tokens: int = 128,
        priority: Priority | int = Priority.NORMAL,
        deadline: float | None = None,
        admission_timeout: float | _Default | None = DEFAULT,
        difficulty: float | None = None,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        seed: int = 0,
    ) -> CompletionResult:
        """Generate a completion on the best model for it now.

        Args:
            prompt: the prompt text.
            kind: what the prompt asks for; ``"auto"`` runs the classifier.
            max_tokens: most tokens to generate.
            priority: higher priority is served first within a mailbox.
            deadline: absolute time on :meth:`clock` by which the request must finish.
            admission_timeout: seconds to wait for mailbox room (``0``: refuse at once,
                ``None``: until the deadline); default the scheduler's.
            difficulty: ``[0, 1]`` hint for policies; default from the classifier (auto) or 0.5.
            stop, temperature, seed: passed to the backend.

        Raises:
            Overloaded: every capable mailbox is full (``retry_after`` is a hint in seconds).
            ModelUnavailable: every model the policy may use for the kind is down or
                restarting (an ``optional`` model that failed to load is down). Raised at once
                when they are all down, whatever ``admission_timeout`` says: waiting is for room.
                A kind no configured model serves is :class:`~zeta.NoCapableModelError` instead.
            DeadlineExceeded: the deadline passed (a queued request never runs).
            ActorDead: the model died mid-request and no other capable model could take it.
            InvalidRequestError: the arguments are invalid.
            NoCapableModelError: no configured model serves the kind.
            SchedulerClosed: the scheduler is not running.
            BackendError: the backend failed this request.
        """
        # Invalid input raises at once, without a checkpoint: the request is already counted,
        # and a cancellation delivered now would hide the error the ledger recorded.
        request = self._new_completion(
            prompt,
            kind,
            max_tokens,
            priority,
            deadline,
            difficulty,
            stop,
            temperature,
            seed,
            stream=False,
        )
        result: CompletionResult = await self._execute(request, admission_timeout)
        return result

    def stream(
        self,
        prompt: str,
        *,
        kind: Kind | str = Kind.AUTO,
        max_tokens: int = 128,
        priority: Priority | int = Priority.NORMAL,
        deadline: float | None = None,
        admission_timeout: float | _Default | None = DEFAULT,
        difficulty: float | None = None,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        seed: int = 0,
    ) -> TokenStream:
        """Like :meth:`complete`, but yields the text piece by piece as it is generated::

            async with zs.stream("Tell me a story") as pieces:
                async for piece in pieces:
                    print(piece, end="")

        The request is admitted on the first iteration (where :class:`~zeta.Overloaded` and the
        other admission errors surface). Leaving the loop early, closing the stream, or dropping
        it stops generation at the next token. After the last piece, ``.result`` holds the
        :class:`~zeta.CompletionResult`.

        Raises:
            InvalidRequestError, NoCapableModelError: at once, for invalid arguments.
        """
        request = self._new_completion(
            prompt,
            kind,
            max_tokens,
            priority,
            deadline,
            difficulty,
            stop,
            temperature,
            seed,
            stream=True,
        )
        return TokenStream(self, request, admission_timeout)

    async def embed(
        self,
        texts: str | Sequence[str],
        *,
        priority: Priority | int = Priority.NORMAL,
        deadline: float | None = None,
        admission_timeout: float | _Default | None = DEFAULT,
    ) -> EmbeddingResult:
        """Embed one text or a batch on a model that serves ``embed``; one vector per text.

        Raises the same errors as :meth:`complete`.
        """
        now = self._clock()
        rid = next(self._ids)
        try:
            try:
                batch = [texts] if isinstance(texts, str) else list(texts)
            except TypeError:
                raise InvalidRequestError(
                    "texts must be a string or a sequence of strings"
                ) from None
            if not batch:
                raise InvalidRequestError("texts must not be empty")
            for t in batch:
                if not isinstance(t, str) or not t:
                    raise InvalidRequestError("every text must be a non-empty string")
            prio = self._priority(priority)
            dl = self._deadline(deadline, now)
            if not self._router.capable[Kind.EMBED]:
                raise NoCapableModelError("no configured model serves 'embed'")
        except Exception as exc:
            self._record_unrouted(rid, Kind.EMBED.value, now, exc)
            raise
        route = RouteRequest(Kind.EMBED, KIND_INDEX[Kind.EMBED], 0.0, 0.5, prio)
        request = Request(
            rid,
            Op.EMBED,
            route,
            created_at=now,
            deadline=dl,
            texts=batch,
            preferred=self._router.preferred[Kind.EMBED],
            new_event=self._new_event,
        )
        result: EmbeddingResult = await self._execute(request, admission_timeout)
        return result

    async def calibrate(self) -> dict[str, float]:
        """Run the calibration hook now; return the parameters it changed (empty if none)."""
        applied = await self._supervisor.calibrate_once()
        return dict(applied or {})

    # -- building requests ------------------------------------------------------------------
    def _new_completion(
        self,
        prompt: str,
        kind: Kind | str,
        max_tokens: int,
        priority: Priority | int,
        deadline: float | None,
        difficulty: float | None,
        stop: Sequence[str],
        temperature: float,
        seed: int,
        *,
        stream: bool,
    ) -> Request:
        """A validated, classified request.

        Raises:
            InvalidRequestError, NoCapableModelError: after recording the request as invalid.
            Exception: whatever a custom classifier raised, after recording it as an error.
        """
        now = self._clock()
        rid = next(self._ids)
        label = Kind.AUTO.value
        try:
            if type(prompt) is not str or not prompt:
                raise InvalidRequestError("prompt must be a non-empty string")
            k = kind if type(kind) is Kind else self._kind(kind)
            label = k.value
            if k is Kind.EMBED:
                raise InvalidRequestError("use embed() for embeddings")
            if type(max_tokens) is not int or max_tokens < 1:
                raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
            prio = priority if type(priority) is Priority else self._priority(priority)
            dl = None if deadline is None else self._deadline(deadline, now)
            if difficulty is not None and (
                isinstance(difficulty, bool)
                or not isinstance(difficulty, (int, float))
                or not 0.0 <= difficulty <= 1.0
            ):
                raise InvalidRequestError(f"difficulty must be in [0, 1], got {difficulty!r}")
            stops: tuple[str, ...] = ()
            if stop:
                try:
                    stops = () if isinstance(stop, str) else tuple(stop)
                except TypeError:
                    pass
                if not stops or not all(type(x) is str for x in stops):
                    raise InvalidRequestError("stop must be a sequence of strings")
            if not (type(temperature) in (int, float) and 0.0 <= temperature < math.inf):
                raise InvalidRequestError(f"temperature must be a number >= 0, got {temperature!r}")
            if type(seed) is not int:
                raise InvalidRequestError(f"seed must be an integer, got {seed!r}")
            if k is Kind.AUTO:
                verdict = self._classifier.classify(prompt)
                k = self._auto_kinds.get(verdict.kind, Kind.SIMPLE)
                label = k.value
                diff = verdict.difficulty if difficulty is None else float(difficulty)
            else:
                diff = 0.5 if difficulty is None else float(difficulty)
            if not self._router.capable[k]:
                raise NoCapableModelError(f"no configured model serves {k.value!r}")
            params = CompletionParams(prompt, max_tokens, stops, float(temperature), seed)
        except Exception as exc:
            # Also a custom classifier's own exception: it reaches the caller as it is, and the
            # request is counted (as an error) like every other.
            self._record_unrouted(rid, label, now, exc)
            raise
        return Request(
            rid,
            Op.COMPLETE,
            RouteRequest(k, KIND_INDEX[k], float(max_tokens), diff, prio),
            created_at=now,
            deadline=dl,
            params=params,
            stream=stream,
            preferred=self._router.preferred[k],
            new_event=self._new_event,
        )

    @staticmethod
    def _kind(kind: Kind | str) -> Kind:
        try:
            return Kind(kind)
        except (ValueError, TypeError):
            raise InvalidRequestError(
                f"unknown kind {kind!r}; expected one of {[x.value for x in Kind]}"
            ) from None

    @staticmethod
    def _priority(priority: Priority | int) -> Priority:
        try:
            return Priority(priority)
        except (ValueError, TypeError):
            raise InvalidRequestError(
                f"unknown priority {priority!r}; expected one of {[p.name for p in Priority]}"
            ) from None

    @staticmethod
    def _deadline(deadline: float | None, now: float) -> float | None:
        if deadline is not None:
            if (
                isinstance(deadline, bool)
                or not isinstance(deadline, (int, float))
                or math.isnan(deadline)
            ):
                raise InvalidRequestError(f"deadline must be a number, got {deadline!r}")
            if deadline <= now:
                raise InvalidRequestError("deadline is in the past")
        return deadline

    # -- running requests -------------------------------------------------------------------
    async def _execute(self, request: Request, admission_timeout: float | _Default | None) -> Any:
        outcome = Outcome.ERROR
        try:
            await self._admit(request, admission_timeout)
            await self._wait(request)
            error = request.error
            if error is not None:
                raise error
            outcome = Outcome.OK
            return request.result
        except BaseException as exc:
            outcome = _outcome_of(exc, self._cancelled)
            request.abandon()
            raise
        finally:
            self._record(request, outcome)

    def _dispatch(self, request: Request) -> bool:
        i = self._router.choose(request.route)
        return i is not None and self._actors[i].enqueue(request, self._clock())

    async def _admit(self, request: Request, admission_timeout: float | _Default | None) -> None:
        """Queue the request on an actor, waiting for room if allowed.

        Raises:
            Overloaded, ModelUnavailable: no room (or no live model) within the admission timeout.
            DeadlineExceeded: the deadline passed while waiting for room.
            SchedulerClosed: the scheduler is not running.
        """
        if self._phase is not _Phase.RUNNING:
            await anyio.lowlevel.checkpoint()
            raise SchedulerClosed("the scheduler is not running")
        if admission_timeout is DEFAULT:
            limit = self._admission_timeout
        else:
            limit = admission_timeout
            if limit is not None:
                _non_negative_request("admission_timeout", limit)
        if self._dispatch(request):
            return
        if self._out_of_service(request):
            # Waiting is for room; a down model gains none until a probe brings it back.
            await anyio.lowlevel.checkpoint()
            raise self._refusal(request)
        wait = math.inf if limit is None else limit
        if request.deadline is not None:
            wait = min(wait, request.deadline - self._clock())
        if wait > 0:
            # Join this kind's line; _notify_capacity admits the line's head when room appears.
            line = self._waiting[request.kind]
            waiter = line[request] = _RoomWaiter(self._new_event())
            try:
                with anyio.move_on_after(wait):
                    await waiter.event.wait()
            finally:
                line.pop(request, None)
            if waiter.error is not None:
                raise waiter.error
            if request.state is not RequestState.NEW:
                return  # admitted (possibly just as the timeout fired)
            if self._phase is not _Phase.RUNNING:
                raise SchedulerClosed("the scheduler closed while the request waited for room")
        else:
            await anyio.lowlevel.checkpoint()
        if request.deadline is not None and self._clock() >= request.deadline:
            raise DeadlineExceeded(f"request {request.id}: deadline passed while waiting for room")
        raise self._refusal(request)

    def _out_of_service(self, request: Request) -> bool:
        """Whether every actor the policy may use for ``request`` is down (or stopped)."""
        actors = self._actors
        return all(
            actors[i].state in (ActorState.DOWN, ActorState.STOPPED)
            for i in self._router.scope(request.route)
        )

    def _refusal(self, request: Request) -> TryAgainError:
        """Why the policy would not place ``request``: no actor it may use is ready
        (:class:`~zeta.ModelUnavailable`), or they are all full (:class:`~zeta.Overloaded`).

        "May use" is the policy's scope (see :meth:`Router.scope`): under ``static`` a ``code``
        request whose coder is down is unavailable, even if the reasoner could serve code.
        """
        kind = request.kind
        scope = self._router.scope(request.route)
        live = [i for i in scope if self._actors[i].state is ActorState.READY]
        if not live:
            names = sorted({self._actors[i].name for i in scope})
            return ModelUnavailable(
                f"every model the policy may use for {kind.value!r} is down or restarting: {names}"
            )
        return Overloaded(
            f"no model can take a {kind.value!r} request now (mailboxes full)",
            retry_after=self._router.retry_after(kind, request.route.est_tokens, live),
        )

    def _notify_capacity(self) -> None:
        """Room may have appeared: admit waiting requests, oldest first within each kind.

        Called by actors on the loop whenever a full mailbox frees a slot or an actor becomes
        ready. The head of a kind's line is placed here, synchronously, so a freed slot costs one
        routing decision per kind instead of waking every waiter to race for it, and a newcomer
        cannot take the slot first. A line stops at its first request that cannot be placed.
        """
        if self._phase is not _Phase.RUNNING:
            return
        for line in self._waiting.values():
            while line:
                request, waiter = next(iter(line.items()))
                try:
                    if not self._dispatch(request):
                        break
                except Exception as exc:  # a buggy user policy: its caller gets the error
                    waiter.error = exc
                del line[request]
                waiter.event.set()

    def _release_waiters(self) -> None:
        """Wake every request waiting for room (the scheduler is closing); each one raises."""
        for line in self._waiting.values():
            for waiter in line.values():
                waiter.event.set()
            line.clear()

    async def _wait(self, request: Request) -> None:
        """Wait until the request is settled, failing it with DeadlineExceeded at its deadline."""
        deadline = request.deadline
        if deadline is None:
            while not request.done:
                await request.wait()
            return
        with anyio.move_on_after(deadline - self._clock()):
            while not request.done:
                await request.wait()
        self._expire(request)

    async def _wait_progress(self, request: Request) -> None:
        """Wait for a streamed piece or settlement, enforcing the deadline."""
        deadline = request.deadline
        if deadline is None:
            await request.wait()
            return
        with anyio.move_on_after(deadline - self._clock()):
            await request.wait()
            return
        self._expire(request)

    def _expire(self, request: Request) -> None:
        if not request.done:
            request.abandoned = True
            request.finish(error=DeadlineExceeded(f"request {request.id}: deadline passed"))

    # -- the ledger -------------------------------------------------------------------------
    def _record(self, request: Request, outcome: Outcome) -> None:
        """Count the request's end, exactly once, and log its summary line."""
        if request.recorded:
            return
        request.recorded = True
        actor = request.actor
        model = actor.name if actor is not None else None
        now = self._clock()
        enqueued, started = request.enqueued_at, request.started_at
        queue_wait = None
        if enqueued is not None:
            queue_wait = (started if started is not None else now) - enqueued
        kind = request.kind.value
        recorder = self.recorder
        recorder.request_finished(
            model,
            kind,
            outcome,
            queue_wait_s=queue_wait,
            service_s=request.service_s,
            total_s=now - request.created_at,
        )
        spilled_from = None
        if outcome is Outcome.OK:
            if request.preferred is not None and model != request.preferred:
                spilled_from = request.preferred
                recorder.spilled(spilled_from, model or "none")
        elif outcome is Outcome.OVERLOADED:
            recorder.rejected(kind)
        if _stdlib_log.isEnabledFor(logging.INFO):
            log.info(
                "request_finished",
                request_id=request.id,
                model=model,
                kind=kind,
                outcome=outcome.value,
                queue_wait_s=queue_wait,
                service_s=request.service_s,
                spilled_from=spilled_from,
            )

    def _record_unrouted(self, request_id: int, kind: str, now: float, exc: Exception) -> None:
        """Count a request that failed before it became one (invalid input, a classifier bug)."""
        outcome = Outcome.INVALID if isinstance(exc, InvalidInputError) else Outcome.ERROR
        self.recorder.request_finished(None, kind, outcome, total_s=self._clock() - now)
        if _stdlib_log.isEnabledFor(logging.INFO):
            log.info(
                "request_finished",
                request_id=request_id,
                model=None,
                kind=kind,
                outcome=outcome.value,
                queue_wait_s=None,
                service_s=None,
                spilled_from=None,
            )

    def _abandon_orphan(self, request: Request) -> None:
        """A stream was garbage-collected mid-way: stop it and count it (on the event loop)."""
        request.abandon()
        self._record(request, Outcome.CANCELLED)


def _non_negative_request(key: str, value: object) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if not ok or value < 0:  # type: ignore[operator]
        raise InvalidRequestError(f"{key} must be a number >= 0 or None, got {value!r}")


class TokenStream:
    """The pieces of one streamed completion, as an async iterator (see :meth:`Scheduler.stream`).

    Also an async context manager whose exit stops the request if it is still running.
    """

    def __init__(
        self, scheduler: Scheduler, request: Request, admission_timeout: float | _Default | None
    ) -> None:
        self._scheduler = scheduler
        self._request = request
        self._admission_timeout = admission_timeout
        self._admitted = False
        self._ended = False
        #: The finished completion, once the last piece has been consumed.
        self.result: CompletionResult | None = None

    @property
    def request_id(self) -> int:
        return self._request.id

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> str:
        if self._ended:
            raise StopAsyncIteration
        request = self._request
        scheduler = self._scheduler
        try:
            if not self._admitted:
                self._admitted = True
                await scheduler._admit(request, self._admission_timeout)
            pieces = request.pieces
            assert pieces is not None
            while True:
                if pieces:
                    await anyio.lowlevel.checkpoint()
                    return pieces.popleft()
                if request.done:
                    if request.error is not None:
                        raise request.error
                    self.result = request.result
                    self._end(Outcome.OK)
                    raise StopAsyncIteration
                await scheduler._wait_progress(request)
        except StopAsyncIteration:
            raise
        except BaseException as exc:
            self._end(_outcome_of(exc, scheduler._cancelled))
            request.abandon()
            raise

    def _end(self, outcome: Outcome) -> None:
        self._ended = True
        self._scheduler._record(self._request, outcome)

    async def aclose(self) -> None:
        """Stop the request if it is still running (generation stops at the next token)."""
        if self._close():
            await anyio.lowlevel.checkpoint()

    def _close(self) -> bool:
        """Abandon a live request and count it as cancelled; ``False`` if it had already ended."""
        if self._ended:
            return False
        self._ended = True
        if not self._admitted:
            return False
        # The caller left before the end: whatever happened since, it got no result.
        self._request.abandon()
        self._scheduler._record(self._request, Outcome.CANCELLED)
        return True

    async def __aenter__(self) -> TokenStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # No checkpoint here: a cancellation delivered on exit would replace the result or error
        # the body just saw (and the ledger recorded) with a Cancelled.
        self._close()

    def __del__(self) -> None:
        # Dropped mid-way (e.g. ``break`` out of ``async for`` without closing): stop generating
        # now (the worker reads the flag) and count the request on the event loop's thread.
        if self._admitted and not self._ended:
            self._ended = True
            request = self._request
            request.abandoned = True
            handle = self._scheduler._handle
            if handle is not None:
                handle.call_soon(self._scheduler._abandon_orphan, request)
