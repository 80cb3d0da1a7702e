"""The sans-IO bookkeeping of remaps, removals and unmaps, against a page-by-page model."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

import uffd_async as ua
from uffd_async._core._addrspace import AddressMap, IntervalSet

P = ua.PAGE_SIZE
BASE = 0x10000000
PAGES = 32


def test_interval_set_merges() -> None:
    s = IntervalSet()
    s.add(10, 20)
    s.add(30, 40)
    s.add(15, 35)
    assert s.intervals() == [(10, 40)]
    s.add(40, 45)
    assert s.intervals() == [(10, 45)]
    assert 10 in s and 44 in s and 45 not in s and 9 not in s
    assert s.next_boundary(5) == 10 and s.next_boundary(10) is None


def test_remap_then_remove() -> None:
    m = AddressMap(BASE, 4 * P)
    m.apply(ua.Remap(from_address=BASE + P, to_address=0x90000000, length=2 * P))
    assert m.original(0x90000000) == BASE + P
    assert m.original(0x90000000 + P) == BASE + 2 * P
    assert m.original(BASE + P) is None
    assert m.original(BASE + 3 * P) == BASE + 3 * P
    removed = m.apply(ua.Remove(start=0x90000000 + P, end=0x90000000 + 2 * P))
    assert removed == [(BASE + 2 * P, BASE + 3 * P)]
    assert BASE + 2 * P in m.removed
    m.apply(ua.Unmap(start=BASE + 3 * P, end=BASE + 4 * P))
    assert m.original(BASE + 3 * P) is None


events = st.one_of(
    st.builds(
        lambda a, b, n: ua.Remap(from_address=BASE + a * P, to_address=BASE + b * P, length=n * P),
        st.integers(0, 3 * PAGES), st.integers(0, 3 * PAGES), st.integers(1, PAGES),
    ),
    st.builds(
        lambda a, n: ua.Remove(start=BASE + a * P, end=BASE + (a + n) * P),
        st.integers(0, 3 * PAGES), st.integers(1, PAGES),
    ),
    st.builds(
        lambda a, n: ua.Unmap(start=BASE + a * P, end=BASE + (a + n) * P),
        st.integers(0, 3 * PAGES), st.integers(1, PAGES),
    ),
)  # fmt: skip


@given(st.lists(events, max_size=12))
def test_matches_a_page_by_page_model(
    sequence: list[ua.Remap | ua.Remove | ua.Unmap],
) -> None:
    model = {BASE + i * P: BASE + i * P for i in range(PAGES)}  # current -> original
    removed: set[int] = set()
    m = AddressMap(BASE, PAGES * P)
    for event in sequence:
        m.apply(event)
        if isinstance(event, ua.Remap):
            moved = {
                a: o
                for a, o in model.items()
                if event.from_address <= a < event.from_address + event.length
            }
            for a in moved:
                del model[a]
            for a in list(model):
                if event.to_address <= a < event.to_address + event.length:
                    del model[a]
            for a, o in moved.items():
                model[a - event.from_address + event.to_address] = o
        elif isinstance(event, ua.Unmap):
            for a in list(model):
                if event.start <= a < event.end:
                    del model[a]
        else:
            removed |= {o for a, o in model.items() if event.start <= a < event.end}
    for page in range(4 * PAGES):
        address = BASE + page * P
        assert m.original(address) == model.get(address)
    for index in range(PAGES):
        original = BASE + index * P
        assert (original in m.removed) == (original in removed)
