"""One planted bug: see run.py."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    old: str
    new: str
    tests: Sequence[str]
    #: Why a user would care, one line (shown in the report).
    why: str = ""
    timeout: float = 240.0
    extra_args: Sequence[str] = field(default_factory=tuple)
