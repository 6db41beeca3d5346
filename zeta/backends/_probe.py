"""The load probe: open a model and use it once in a throwaway process, so a crash is not ours.

llama.cpp stops the whole process (``abort()``) on some malformed models, at load or only at the
first tokenize, decode or embed. :func:`verify` runs ``python -m zeta.backends._probe`` on a file
not yet verified: the child opens it through the real llama.cpp backend and runs one tokenize,
one short completion and one embedding. A child that dies on a signal becomes a
:class:`~zeta.ModelLoadError` naming the file, the signal and what the child was doing; the
caller's process never runs the code that crashed.

Verdicts are cached by the file's SHA-256 (plus :data:`PROBE_VERSION` and the llama-cpp-python
version) under ``<cache_dir>/verified``, so each file is probed once per llama.cpp version. A
clean verdict and a crash are cached; a timeout, an out-of-memory kill or an ordinary load error
are not, as they may not be the file's fault. Files zeta generated itself are trusted and never
probed: the model ladder records each file's digest as it writes it (``zeta._ladder.is_trusted``).

The digest of a file is remembered by its path and ``stat`` (device, inode, size, modification
and change times), so a large model is hashed once, not at every start; any write to the file
changes its change time and so forces a new hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._exceptions import ModelLoadError, ZetaError
from .._ladder import cache_dir, is_trusted
from .._types import Kind, ModelSpec
from ..telemetry._logging import get_logger

__all__ = ["PROBE_VERSION", "ProbeRequest", "file_digest", "verify"]

log = get_logger(__name__)

#: Bumped whenever what the probe exercises changes, so older verdicts no longer count.
PROBE_VERSION = 2  # 2: the probe runs the batched (multi-slot, shared KV) context

#: Context size the probe opens the model with: enough for its text, small for its KV cache.
_PROBE_N_CTX = 256
#: Exit status of a child that finished with an ordinary (catchable) error.
_EXIT_ERROR = 3
#: Signals that mean llama.cpp crashed on the file; other deaths (SIGKILL from the OOM killer,
#: SIGTERM from a shutdown) say nothing about the file and are not cached.
_CRASH_SIGNALS = frozenset(
    {signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGTRAP}
)
#: Text the probe tokenizes, completes and embeds: ASCII, punctuation, whitespace, a control
#: character and multi-byte characters, so an SPM vocabulary's byte fallback runs too.
_PROBE_TEXT = "Hello, world! def main():\n\treturn 42 # héllo wörld 日本語 \x01 🙂"


@dataclass(frozen=True, slots=True)
class ProbeRequest:
    """How the probe opens the model: the placement and options of the spec it stands for."""

    path: str
    kinds: tuple[str, ...]
    n_threads: int = 1
    n_gpu_layers: int = 0
    device: int | None = None
    pooling: str = "model"
    use_mmap: bool = True
    gguf_check: bool = True

    @classmethod
    def for_spec(cls, spec: ModelSpec, path: Path, **options: Any) -> ProbeRequest:
        return cls(
            path=str(path),
            kinds=tuple(sorted(k.value for k in spec.kinds)),
            n_threads=spec.n_threads,
            n_gpu_layers=spec.n_gpu_layers,
            device=spec.device,
            **options,
        )

    @property
    def mode(self) -> str:
        """What the verdict covers: an embeddings-only context or a full one, and the pooling."""
        return ("embed" if self.kinds == (Kind.EMBED.value,) else "full") + f"-{self.pooling}"


# --------------------------------------------------------------------------------------------
# Digests and the verdict store.


def _cache_root() -> Path:
    return cache_dir() / "verified"


def _stat_key(path: Path) -> str:
    st = os.stat(path)
    fields = (
        os.path.realpath(path),
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
    )
    raw = "|".join(map(str, fields))
    return hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()


class _Store:
    """Small records under the cache directory, mirrored in memory; writes are atomic and a
    failure to write (a read-only cache) only costs a probe next time."""

    def __init__(self) -> None:
        self._memory: dict[tuple[Path, str], Any] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Any:
        root = _cache_root()
        with self._lock:
            if (root, name) in self._memory:
                return self._memory[(root, name)]
        try:
            value = json.loads((root / name).read_text())
        except (OSError, ValueError):
            return None
        with self._lock:
            self._memory[(root, name)] = value
        return value

    def put(self, name: str, value: Any) -> None:
        root = _cache_root()
        with self._lock:
            self._memory[(root, name)] = value
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=root)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(value, f)
                os.replace(tmp, root / name)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            log.debug("verdict_not_saved", name=name, error=str(exc))


_store = _Store()
_digest_locks: dict[str, threading.Lock] = {}
_digest_locks_guard = threading.Lock()


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the file's bytes, hex; remembered by path and ``stat`` (see the module doc)."""
    p = Path(path)
    key = f"stat-{_stat_key(p)}"
    cached = _store.get(key)
    if isinstance(cached, str):
        return cached
    h = hashlib.sha256()
    with p.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    _store.put(key, digest)
    return digest


def _verdict_name(digest: str, request: ProbeRequest, llama_version: str) -> str:
    version = re.sub(r"[^\w.+-]", "_", llama_version)
    return f"{digest}.{request.mode}.p{PROBE_VERSION}.llama-{version}.json"


# --------------------------------------------------------------------------------------------
# The parent side.


def verify(request: ProbeRequest, *, llama_version: str, timeout_s: float) -> None:
    """Return if the file is trusted or passed a probe before; else probe it now (blocks).

    Raises:
        ModelLoadError: the probe crashed (a cached verdict, or now), failed to load the model,
            or did not finish within ``timeout_s``.
    """
    path = request.path
    try:
        digest = file_digest(path)
    except OSError as exc:
        raise ModelLoadError(f"cannot read: {exc.strerror or exc}", path=path) from None
    if is_trusted(digest):
        return
    name = _verdict_name(digest, request, llama_version)
    with _digest_locks_guard:
        lock = _digest_locks.setdefault(digest, threading.Lock())
    with lock:  # two replicas of one model probe it once
        verdict = _store.get(name)
        if isinstance(verdict, dict):
            log.debug("probe_verdict_cached", path=path, ok=verdict.get("ok"))
        else:
            verdict = _run_probe(request, timeout_s)
            _store.put(name, verdict)
    if verdict.get("ok") is not True:
        raise ModelLoadError(str(verdict.get("reason") or "refused by the load probe"), path=path)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # The child must import this same zeta, installed or not.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (package_root, env.get("PYTHONPATH"))))
    # ggml prints a backtrace on abort by attaching gdb, which takes seconds; the stage and the
    # assertion message are enough.
    env["GGML_NO_BACKTRACE"] = "1"
    return env


_SOURCE_PATH = re.compile(r"\S*/(?=[\w.+-]+:\d+: )")


def _tail(text: str, lines: int = 3, chars: int = 600) -> str:
    """The last lines of the child's stderr, one line, with build paths cut to file names."""
    kept = [_SOURCE_PATH.sub("", line.strip()) for line in text.splitlines() if line.strip()]
    return " | ".join(kept[-lines:])[-chars:]


def _run_probe(request: ProbeRequest, timeout_s: float) -> dict[str, Any]:
    """Run the child and return a verdict worth caching; raise for an outcome that is not."""
    path = request.path
    if not sys.executable:
        raise ModelLoadError(
            "cannot probe the model: no Python interpreter to run (sys.executable is empty); "
            "set options.probe to false to load it unprobed",
            path=path,
        )
    payload = json.dumps(
        {f: getattr(request, f) for f in ProbeRequest.__dataclass_fields__}, ensure_ascii=True
    )
    log.info("model_probe_started", path=path, mode=request.mode)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "zeta.backends._probe", payload],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout_s,
            env=_child_env(),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ModelLoadError(
            f"the load probe did not finish within {timeout_s:g}s; raise options.probe_timeout_s "
            "or set options.probe to false",
            path=path,
        ) from None
    except OSError as exc:
        raise ModelLoadError(f"cannot start the load probe: {exc}", path=path) from None
    out = proc.stdout.decode("utf-8", "replace")
    err = proc.stderr.decode("utf-8", "replace")
    stages = [line[len("stage: ") :] for line in out.splitlines() if line.startswith("stage: ")]
    stage = stages[-1] if stages else "starting"
    rc = proc.returncode
    if rc == 0 and stage == "done":
        log.info("model_probe_passed", path=path, mode=request.mode)
        return {"ok": True, "path": path}
    if rc < 0:
        try:
            sig = signal.Signals(-rc)
            signame = sig.name
        except ValueError:
            sig, signame = None, f"signal {-rc}"
        detail = _tail(err)
        reason = f"llama.cpp crashed on this file ({signame} in the load probe, at {stage})" + (
            f": {detail}" if detail else ""
        )
        log.warning("model_probe_crashed", path=path, signal=signame, stage=stage)
        if sig in _CRASH_SIGNALS:
            return {"ok": False, "path": path, "reason": reason, "signal": signame}
        raise ModelLoadError(reason, path=path)
    message = ""
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError, AttributeError):
                message = str(json.loads(line).get("error", ""))
            break
    if rc == _EXIT_ERROR and message:
        log.info("model_probe_failed", path=path, stage=stage)
        raise ModelLoadError(message, path=path)
    detail = _tail(err) or "no output"
    raise ModelLoadError(
        f"the load probe failed (exit status {rc}, at {stage}): {detail}", path=path
    )


# --------------------------------------------------------------------------------------------
# The child side.


def _strip_path(message: str, path: str) -> str:
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def _stage(name: str) -> None:
    print(f"stage: {name}", flush=True)


def _child(request: Mapping[str, Any]) -> int:
    from . import get_backend  # by name, as the scheduler does (llama_cpp imports this module)
    from ._base import CompletionParams

    open_backend = get_backend("llama_cpp")

    path = str(request["path"])
    kinds: Sequence[str] = request["kinds"]
    spec = ModelSpec(
        name="probe",
        path=path,
        kinds=frozenset(Kind(k) for k in kinds),
        n_ctx=_PROBE_N_CTX,
        n_threads=int(request["n_threads"]),
        n_gpu_layers=int(request["n_gpu_layers"]),
        device=request["device"],
        options={
            "probe": False,
            "gguf_check": bool(request["gguf_check"]),
            "pooling": str(request["pooling"]),
            "use_mmap": bool(request["use_mmap"]),
        },
    )
    try:
        _stage("load")
        backend: Any = open_backend(spec, 0)  # a LlamaCppBackend, reached by name
        try:
            _stage("tokenize")
            backend.count_tokens(_PROBE_TEXT)
            if spec.kinds != frozenset({Kind.EMBED}):
                _stage("decode")
                backend.complete(CompletionParams(_PROBE_TEXT, max_tokens=2))
            if backend.pooling != 4:  # LLAMA_POOLING_TYPE_RANK: a reranker has no vectors
                _stage("embed")
                backend.embed([_PROBE_TEXT])
            _stage("close")
        finally:
            backend.close()
    except ZetaError as exc:
        print(json.dumps({"error": _strip_path(str(exc), path)}), flush=True)
        return _EXIT_ERROR
    _stage("done")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the probe process: ``python -m zeta.backends._probe REQUEST_JSON``."""
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        print("usage: python -m zeta.backends._probe REQUEST_JSON", file=sys.stderr)
        return 2
    return _child(json.loads(args[0]))


if __name__ == "__main__":
    sys.exit(main())
