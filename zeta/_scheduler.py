"""The public :class:`Scheduler`: the async request API and the runtime's lifecycle.

The scheduler is a facade over small parts, each with one job:

* :class:`~zeta._intake.Intake` validates and classifies a call into a request;
* :class:`~zeta._admission.Admission` routes it onto an actor's mailbox, or waits for room, or
  refuses it;
* :class:`~zeta._actor.ModelActor` runs it on its model's context, supervised by the
  :class:`~zeta._supervisor.Supervisor`;
* :class:`~zeta._ledger.Ledger` records how it ended, exactly once: as a result, as one typed
  error, or as cancelled.
"""

from __future__ import annotations

import enum
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Unpack

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus

from ._actor import ModelActor, ThreadWorker, ToThreadWorker, Worker
from ._admission import Admission
from ._calibration import CalibrationReport, Calibrator, SampleLog, load_calibrator
from ._chat import ChatResult
from ._classifier import Classifier, HeuristicClassifier
from ._config import (
    MAX_MAILBOX_CAPACITY,
    CalibrationSettings,
    Config,
    MetricsConfig,
    load_config,
)
from ._exceptions import ConfigError
from ._intake import ChatOptions, CompletionOptions, Intake, RequestOptions
from ._ledger import Ledger
from ._loop import LoopHandle
from ._policies import Policy, make_policy
from ._request import CompletionResult, EmbeddingResult, Request
from ._router import Router, build_candidates, check_models
from ._snapshot import SchedulerSnapshot
from ._stream import TokenStream
from ._supervisor import Supervision, Supervisor
from ._types import ModelSpec, Scoring, ServicePrior, check_int, check_number
from .backends import get_backend
from .backends._base import BackendFactory
from .telemetry._recorder import Outcome, Recorder
from .telemetry._samplers import UtilisationSampler

if TYPE_CHECKING:
    from .telemetry._server import MetricsServer

__all__ = ["Scheduler"]

#: The most actors (replicas over all models) one scheduler runs: each has a thread.
MAX_ACTORS = 256
#: The longest interval, timeout or aging time in seconds (besides ``math.inf`` where allowed).
MAX_SECONDS = 1e9


class _Phase(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


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
        models: the models to schedule onto; each replica becomes one actor (at most
            :data:`MAX_ACTORS` in all).
        policy: a policy name (``"dynamic"``, ``"static"``, ``"threshold"``, ``"round_robin"``,
            ``"jsq"``, ``"p2c"``, ``"peak_ewma"``) or a :class:`~zeta.Policy` object.
        scoring: the scoring kernel's parameters (:class:`~zeta.Scoring`), which a calibrator
            may change while it runs.
        classifier: classifies ``kind="auto"`` prompts; default :class:`~zeta.HeuristicClassifier`.
        mailbox_capacity: most requests queued per actor, ``1`` to
            :data:`~zeta._config.MAX_MAILBOX_CAPACITY`.
        admission_timeout: default for how long a request waits for mailbox room when every
            capable actor is full: ``0`` refuses at once with :class:`~zeta.Overloaded`, ``None``
            (or ``math.inf``) waits until the request's deadline. As room appears, waiting
            requests of every kind are placed by priority class, then age (with ``aging_s``).
        aging_s: seconds of waiting, for mailbox room or in a mailbox, that raise a request by
            one priority class (``math.inf`` disables aging). A request's age in its mailbox
            counts from when it was placed there.
        backend_factory: opens contexts for every model; default: the backend each
            :attr:`ModelSpec.backend <zeta.ModelSpec.backend>` names.
        worker: ``"thread"`` (one dedicated thread per context, the default) or ``"to_thread"``
            (``anyio.to_thread.run_sync`` behind a per-context ``CapacityLimiter(1)``).
        supervision: restart, probe, hang and shutdown settings.
        sampler: utilisation sampler run every ``sample_interval`` seconds; default the telemetry
            package's ``DeviceSampler`` (NVML for GPU-placed models, host CPU utilisation for the rest).
        calibrator: calibration hook run every ``calibration_interval`` seconds: a
            :class:`~zeta.Calibrator` object, the name of a shipped one (``"feedback"``, the
            default: refits the service models, tunes the scoring parameters by replaying the
            last window in the simulator, and rolls back a change live traffic disagrees with;
            see ``zeta.sim._calibrate``), or ``None`` for no calibration.
        calibration: the default calibrator's settings (``[calibration]`` in a config file);
            ``enabled=False`` turns the named calibrator off.
        calibration_interval: seconds between calibration runs; default
            ``calibration.interval_s`` (30 s).
        recorder: where request counts and latencies go; default a new
            :class:`~zeta.Recorder` (``zs.recorder``).
        seed: seeds tie-breaking and randomised policies.
        priors: per model name, the service expected before any request is observed
            (:class:`~zeta.ServicePrior`; ``zeta.sim.load_fleet(path).priors()`` reads them from
            a ``zeta profile`` file), so a fresh scheduler does not start from unseeded
            estimates.
        clock: monotonic seconds; deadlines are absolute times on this clock
            (``time.monotonic``, which is also asyncio's loop clock).

    Intervals, timeouts and ``aging_s`` are finite numbers of seconds up to :data:`MAX_SECONDS`
    unless said otherwise. Every invalid argument is a :class:`~zeta.ConfigError` naming it.
    """

    def __init__(
        self,
        models: Sequence[ModelSpec],
        *,
        policy: str | Policy = "dynamic",
        scoring: Scoring = Scoring(),
        classifier: Classifier | None = None,
        mailbox_capacity: int = 64,
        admission_timeout: float | None = 0.0,
        aging_s: float = 10.0,
        backend_factory: BackendFactory | None = None,
        worker: Literal["thread", "to_thread"] = "thread",
        supervision: Supervision | None = None,
        sampler: UtilisationSampler | None = None,
        sample_interval: float = 0.5,
        calibrator: Calibrator | str | None = "feedback",
        calibration: CalibrationSettings | None = None,
        calibration_interval: float | None = None,
        recorder: Recorder | None = None,
        seed: int = 0,
        priors: Mapping[str, ServicePrior] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        models = check_models(models, MAX_ACTORS)
        check_int(mailbox_capacity, "mailbox_capacity", 1, MAX_MAILBOX_CAPACITY)
        if admission_timeout is not None and admission_timeout != math.inf:
            check_number(admission_timeout, "admission_timeout", 0.0, MAX_SECONDS)
        if aging_s != math.inf:
            check_number(aging_s, "aging_s", 0.0, MAX_SECONDS, low_open=True)
        check_number(sample_interval, "sample_interval", 0.0, MAX_SECONDS, low_open=True)
        _kind_of("calibration", calibration, CalibrationSettings, optional=True)
        settings = calibration if calibration is not None else CalibrationSettings()
        if calibration_interval is None:
            calibration_interval = settings.interval_s
        check_number(calibration_interval, "calibration_interval", 0.0, MAX_SECONDS, low_open=True)
        if worker not in ("thread", "to_thread"):
            raise ConfigError(f"must be 'thread' or 'to_thread', got {worker!r}", key="worker")
        check_int(seed, "seed", 0, 2**64 - 1)
        _kind_of("scoring", scoring, Scoring)
        _kind_of("supervision", supervision, Supervision, optional=True)
        _kind_of("recorder", recorder, Recorder, optional=True)
        _has("classifier", classifier, "classify")
        _has("sampler", sampler, "sample")
        if isinstance(calibrator, str):
            calibrator = load_calibrator(calibrator, settings, models) if settings.enabled else None
        _has("calibrator", calibrator, "calibrate")
        _has("backend_factory", backend_factory, "__call__")
        _has("clock", clock, "__call__", optional=False)

        self._models = models
        self._policy = make_policy(policy, seed=seed)
        self._supervision = supervision if supervision is not None else Supervision()
        self._worker_kind = worker
        self._clock = clock
        self.recorder = recorder if recorder is not None else Recorder()
        self._owns_sampler = sampler is None
        if sampler is None:
            from .telemetry._samplers import DeviceSampler

            sampler = DeviceSampler()
        self.sampler: UtilisationSampler = sampler

        router = self._router = Router(
            build_candidates(models, mailbox_capacity), self._policy, scoring=scoring, seed=seed
        )
        self._calibrator = calibrator
        self._samples = SampleLog(settings.max_samples)
        if priors is not None:
            router.seed(priors, clock())
        self._ledger = Ledger(self.recorder, clock)
        if calibrator is not None:  # the calibrator's history: each successful request
            self._ledger.samples = self._samples
        self._intake = Intake(
            router,
            classifier if classifier is not None else HeuristicClassifier(),
            self._ledger,
            clock,
            admission_timeout,
        )
        self._admission = Admission(router, clock, aging_s=aging_s)
        specs = {m.name: m for m in models}
        self._actors: tuple[ModelActor, ...] = tuple(
            ModelActor(
                specs[c.model],
                c.replica,
                c.index,
                table=router.table,
                factory=backend_factory or get_backend(specs[c.model].backend),
                capacity=mailbox_capacity,
                aging_s=aging_s,
                clock=clock,
                on_capacity=self._admission.notify_capacity,
            )
            for c in router.candidates
        )
        self._admission.attach(self._actors)
        self._supervisor = Supervisor(
            self._actors,
            router,
            self._supervision,
            recorder=self.recorder,
            clock=clock,
            snapshot=self.snapshot,
            sampler=sampler,
            sample_interval=sample_interval,
            calibrator=calibrator,
            calibration_interval=calibration_interval,
            samples=self._samples if calibrator is not None else None,
            models=models,
        )
        self._phase = _Phase.NEW
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

        Models (``optional`` ones included), policy and its parameters, scoring parameters and
        mailbox capacity come from the config; ``overrides`` are further keyword arguments of the
        constructor, and win over the config's. If the config's ``[metrics]`` is enabled, the
        scheduler serves Prometheus metrics there while it runs (:attr:`metrics_server`).

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
    def scoring(self) -> Scoring:
        """The scoring parameters in force (a calibrator may have changed them)."""
        return self._router.scoring

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
        handle = LoopHandle.current()
        self._intake.new_event = self._admission.new_event = handle.new_event
        self._ledger.handle = handle
        self._ledger.cancelled = anyio.get_cancelled_exc_class()
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
                    unloaded = await self._supervisor.open_all()
                except Exception as exc:
                    startup_error = exc
                    tg.cancel_scope.cancel()
                else:
                    self._supervisor.serve_all(tg, unloaded)
                    self._phase = _Phase.RUNNING
                    self._admission.open = True
                    task_status.started(self)
                    try:
                        await self._closing.wait()
                    finally:
                        with anyio.CancelScope(shield=True):
                            self._phase = _Phase.CLOSING
                            self._admission.close()
                            await self._supervisor.shut_down()
                        tg.cancel_scope.cancel()
        finally:
            self._phase = _Phase.CLOSED
            self._admission.close()
            self._supervisor.release(close_sampler=self._owns_sampler)
            server, self.metrics_server = self.metrics_server, None
            if server is not None:
                with anyio.CancelScope(shield=True):
                    await server.aclose()
            self._stopped.set()
        if startup_error is not None:
            raise startup_error

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
    async def complete(self, prompt: str, **options: Unpack[CompletionOptions]) -> CompletionResult:
        """Generate a completion on the best model for it now.

        Args:
            prompt: the prompt text.
            **options: see :class:`~zeta.CompletionOptions` (``kind``, ``max_tokens``,
                ``priority``, ``deadline``, ``admission_timeout``, ``difficulty``, ``stop``,
                ``temperature``, ``seed``).

        Raises:
            Overloaded: every capable mailbox is full (``retry_after`` is a hint in seconds).
            ModelUnavailable: every model the policy may use for the kind is down or
                restarting (an ``optional`` model that failed to load is down). Raised at once
                when they are all down, whatever ``admission_timeout`` says: waiting is for room.
                A kind no configured model serves is :class:`~zeta.NoCapableModelError` instead.
            DeadlineExceeded: the deadline passed (a queued request never runs).
            ActorDead: the model died mid-request and no other capable model could take it.
            InvalidRequestError: the arguments are invalid (raised at once).
            NoCapableModelError: no configured model serves the kind.
            SchedulerClosed: the scheduler is not running.
            BackendError: the backend failed this request.
        """
        # Invalid input raises at once, without a checkpoint: the call is already counted,
        # and a cancellation delivered now would hide the error the ledger recorded.
        request = self._intake.completion(prompt, options, stream=False)
        result: CompletionResult = await self._execute(request)
        return result

    def stream(
        self, prompt: str, **options: Unpack[CompletionOptions]
    ) -> TokenStream[CompletionResult]:
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
        request = self._intake.completion(prompt, options, stream=True)
        return TokenStream(request, self._admission, self._ledger, self._clock)

    async def chat(
        self, messages: Sequence[Mapping[str, Any]], **options: Unpack[ChatOptions]
    ) -> ChatResult:
        """Answer a conversation on the best model for it now, rendered with that model's own
        chat template::

            reply = await zs.chat([{"role": "user", "content": "Sort a list in Python"}])

        Args:
            messages: OpenAI-style messages: ``{"role": "system" | "developer" | "user" |
                "assistant" | "tool", "content": ...}`` (content a string or a list of text
                parts; an assistant message may carry ``tool_calls``, a tool message its
                ``tool_call_id``).
            **options: see :class:`~zeta.ChatOptions`: the completion options, and ``tools``,
                ``tool_choice`` and ``response_format``.

        Returns:
            The reply, with any tool calls read from it.

        Raises the same errors as :meth:`complete`, and :class:`~zeta.ChatTemplateError` (an
        :class:`~zeta.InvalidRequestError`, naming the model) when the chosen model's template
        cannot render the messages.
        """
        request = self._intake.chat(messages, options, stream=False)
        plan = request.payload.chat  # type: ignore[union-attr]
        assert plan is not None
        completed: CompletionResult = await self._execute(request)
        return plan.reply().finish(completed)

    def chat_stream(
        self, messages: Sequence[Mapping[str, Any]], **options: Unpack[ChatOptions]
    ) -> TokenStream[ChatResult]:
        """Like :meth:`chat`, but yields the reply's text piece by piece (see :meth:`stream`).

        Tool-call text is not streamed: under ``tool_choice="auto"`` the stream holds back text
        that may start a ``<tool_call>`` block and stops where one begins; a forced call
        streams nothing. After the last piece, ``.result`` holds the :class:`~zeta.ChatResult`
        with the calls.

        Raises:
            InvalidRequestError, NoCapableModelError: at once, for invalid arguments.
        """
        request = self._intake.chat(messages, options, stream=True)
        plan = request.payload.chat  # type: ignore[union-attr]
        assert plan is not None
        return TokenStream(request, self._admission, self._ledger, self._clock, plan.reply())

    async def embed(
        self, texts: str | Sequence[str], **options: Unpack[RequestOptions]
    ) -> EmbeddingResult:
        """Embed one text or a batch on a model that serves ``embed``; one vector per text.

        Args:
            texts: one text, or a sequence of them.
            **options: see :class:`~zeta.RequestOptions` (``priority``, ``deadline``,
                ``admission_timeout``).

        Raises the same errors as :meth:`complete`.
        """
        request = self._intake.embedding(texts, options)
        result: EmbeddingResult = await self._execute(request)
        return result

    async def calibrate(self) -> CalibrationReport:
        """Run the calibration hook now; return its report: a mapping of the parameters it
        changed (empty if none), with the run's action, live and predicted objectives, fitted
        service models and parameters as attributes (the ``calibration_finished`` event's
        fields).

        Raises:
            ConfigError: the calibrator proposed an invalid change (nothing was applied).
        """
        report = await self._supervisor.calibrate_once()
        if report is None:
            return CalibrationReport({}, run=0, params=self._router.scoring.as_dict())
        return report

    @property
    def calibrator(self) -> Calibrator | None:
        """The calibrator in use, if any."""
        return self._calibrator

    def calibration_state(self) -> Any:
        """The calibrator's counters and fits (its ``snapshot()``), for the metrics collector;
        ``None`` if it keeps none."""
        snapshot = getattr(self._calibrator, "snapshot", None)
        return snapshot() if callable(snapshot) else None

    async def _execute(self, request: Request) -> Any:
        """Admit the request, wait for its end, and record it."""
        outcome = Outcome.ERROR
        try:
            await self._admission.admit(request)
            await request.wait_done(self._clock)
            error = request.error
            if error is not None:
                raise error
            outcome = Outcome.OK
            return request.result
        except BaseException as exc:
            outcome = self._ledger.outcome_of(exc)
            request.abandon()
            raise
        finally:
            self._ledger.record(request, outcome)


def _kind_of(key: str, value: object, cls: type, *, optional: bool = False) -> None:
    if not (isinstance(value, cls) or (optional and value is None)):
        raise ConfigError(
            f"must be a {cls.__name__}{' or None' if optional else ''}, got {type(value).__name__}",
            key=key,
        )


def _has(key: str, value: object, method: str, *, optional: bool = True) -> None:
    if optional and value is None:
        return
    if not callable(getattr(value, method, None)):
        what = "callable" if method == "__call__" else f"an object with a {method}() method"
        raise ConfigError(f"must be {what}, got {type(value).__name__}", key=key)
