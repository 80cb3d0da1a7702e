"""The calls the README documents are the calls the library has.

Every backticked call in README.md with arguments, whose name resolves to
something of the package (``ua.x``, ``Userfaultfd.open``, ``snapshot.resolver``,
or a bare method of the handle such as ``copy(...)``), must list the real
parameters in order, with ``*`` where the keyword-only ones start and the real
defaults where it shows one. ``...`` stands for "and the rest".
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import uffd_async as ua

README = (Path(__file__).parent.parent / "README.md").read_text()
CALL = re.compile(r"`(?:await )?((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*)\(([^`()]+)\)`")
#: Names the README uses for instances, and where bare method names live.
OWNERS: dict[str, Any] = {
    "ua": ua,
    "snapshot": ua.Snapshot,
    "server": ua.HandoffServer,
    "uffd": ua.Userfaultfd,
    "stats": ua.ServerStats,
}
BARE_OWNERS = (ua.Userfaultfd, ua.ServerStats)


def resolve(name: str) -> Callable[..., Any] | None:
    first, *rest = name.split(".")
    if rest:
        target = OWNERS.get(first, getattr(ua, first, None))
    else:
        target = next((owner for owner in BARE_OWNERS if hasattr(owner, first)), None)
        rest = [first]
    for part in rest:
        target = getattr(target, part, None)
    return target if callable(target) else None


def documented_calls() -> list[tuple[str, str]]:
    calls = {(m[1], m[2]) for m in CALL.finditer(README)}
    return sorted((name, args) for name, args in calls if resolve(name) is not None)


def real_parameters(target: Callable[..., Any]) -> list[inspect.Parameter]:
    parameters = list(inspect.signature(target).parameters.values())
    return [p for p in parameters if p.name not in ("self", "cls")]


def test_the_readme_documents_calls() -> None:
    names = {name for name, _ in documented_calls()}
    assert {"ua.serve_handoffs", "Userfaultfd.open", "ua.send_uffd", "copy"} <= names


@pytest.mark.parametrize(("name", "args"), documented_calls())
def test_a_documented_call_matches_its_signature(name: str, args: str) -> None:
    target = resolve(name)
    assert target is not None
    real = real_parameters(target)
    tokens = [token.strip() for token in args.split(",")]
    rest_omitted = tokens[-1] == "..."
    if rest_omitted:
        tokens.pop()
    shown: list[str] = []
    for token in tokens:
        if token == "*":
            first_keyword = next(
                (i for i, p in enumerate(real) if p.kind is p.KEYWORD_ONLY), len(real)
            )
            assert len(shown) == first_keyword, (
                f"`{name}({args})`: the keyword-only parameters start after "
                f"{[p.name for p in real[:first_keyword]]}"
            )
            continue
        parameter, _, default = token.partition("=")
        index = len(shown)
        assert index < len(real), f"`{name}({args})`: it has no parameter {parameter!r}"
        actual = real[index]
        assert parameter == actual.name, f"`{name}({args})`: {parameter!r} is {actual.name!r}"
        if default and default != "...":
            assert default == repr(actual.default), (
                f"`{name}({args})`: {parameter} defaults to {actual.default!r}"
            )
        shown.append(parameter)
    if not rest_omitted:
        assert shown == [p.name for p in real], f"`{name}({args})` is {inspect.signature(target)}"
    keyword_only = [p.name for p in real if p.kind is p.KEYWORD_ONLY]
    if keyword_only and "*" not in tokens and not rest_omitted:
        pytest.fail(f"`{name}({args})`: {keyword_only} are keyword-only: show the `*`")
