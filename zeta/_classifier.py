"""Classifiers for ``kind="auto"`` requests: what a prompt asks for and how hard it looks.

The router calls the classifier once per auto request, on the event loop, so the default is a
cheap heuristic (a few regular-expression scans over at most ``scan_chars`` characters), not a
model. Users with better signals pass their own :class:`Classifier`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Protocol

from ._exceptions import ConfigError
from ._types import Kind

__all__ = ["Classification", "Classifier", "HeuristicClassifier"]


@dataclass(frozen=True, slots=True)
class Classification:
    """A served kind (never ``AUTO``) and a difficulty estimate in ``[0, 1]``."""

    kind: Kind
    difficulty: float


class Classifier(Protocol):
    """Maps a prompt to a :class:`Classification`. Must be fast and must not block."""

    def classify(self, prompt: str) -> Classification: ...


_CODE = re.compile(
    r"```|^\s*(?:def|class|import|from|fn|func|public|private|#include|package)\b"
    r"|\b(?:function|lambda|return|const|let|var|struct|impl|async def)\b"
    r"|[{};]\s*$|=>|->|==|!=|\w+\([^()\n]*\)\s*[:{]"
    r"|\b(?:SELECT|INSERT|UPDATE)\b.+\b(?:FROM|INTO|SET)\b"
    r"|Traceback \(most recent call last\)|\b(?:TypeError|ValueError|NullPointerException|segfault)\b"
    r"|\b(?:python|javascript|typescript|rust|golang|java|c\+\+|sql|bash|regex|compile[rd]?|"
    r"refactor|debug|unit tests?|stack trace)\b",
    re.IGNORECASE | re.MULTILINE,
)
_REASON = re.compile(
    r"\b(?:why|prove|proof|derive|derivation|explain|step[- ]by[- ]step|reason(?:ing)?|"
    r"analy[sz]e|analysis|compare|trade-?offs?|evaluate|justify|calculate|estimate|plan|"
    r"design|strategy|implications?|what if|how many|how much|optimi[sz]e|theorem|lemma|"
    r"probability|integral|equation)\b|[=+*/^]\s*\d|\d\s*[=+*/^]|[∑∫√≤≥≈]",
    re.IGNORECASE,
)


class HeuristicClassifier:
    """The default classifier: code markers, reasoning cues and length.

    Code markers (fences, keywords, tracebacks, language names) make a prompt ``CODE``; otherwise
    enough reasoning cues (why/prove/compare/step by step, arithmetic) or a high difficulty make it
    ``REASON``; everything else is ``SIMPLE``. Difficulty grows with the logarithm of the length
    and with the number of cues, and saturates at 1.

    Args:
        scan_chars: how many leading characters are scanned (length still counts in full).
        reason_threshold: difficulty from which a prompt with one reasoning cue is ``REASON``.
    """

    def __init__(self, *, scan_chars: int = 4096, reason_threshold: float = 0.35) -> None:
        if isinstance(scan_chars, bool) or not isinstance(scan_chars, int) or scan_chars < 1:
            raise ConfigError(f"must be an integer >= 1, got {scan_chars!r}", key="scan_chars")
        if not 0.0 <= reason_threshold <= 1.0:
            raise ConfigError(
                f"must be in [0, 1], got {reason_threshold!r}", key="reason_threshold"
            )
        self.scan_chars = scan_chars
        self.reason_threshold = reason_threshold

    def classify(self, prompt: str) -> Classification:
        head = prompt[: self.scan_chars]
        code = len(_CODE.findall(head))
        cues = len(_REASON.findall(head))
        words = prompt.count(" ") + prompt.count("\n") + 1
        # ~0.1 for a one-liner, ~0.5 for a few paragraphs, ~0.8 for a few pages.
        difficulty = 0.12 * math.log2(1.0 + words / 8.0) + 0.08 * min(cues, 5)
        difficulty = min(1.0, max(0.0, difficulty))
        if code >= 2 or (code == 1 and cues <= 1):
            return Classification(Kind.CODE, difficulty)
        if cues >= 2 or (cues == 1 and difficulty >= self.reason_threshold) or difficulty >= 0.8:
            return Classification(Kind.REASON, difficulty)
        return Classification(Kind.SIMPLE, difficulty)
