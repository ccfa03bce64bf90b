"""benchmarks.step_profile's replay trace arithmetic: kernel shares of a span when launches overlap (PDL)."""
from benchmarks.step_profile import span_shares


def kernel(name, ts, dur, grid=(1, 1, 1)):
    return {"name": name, "ts": ts, "dur": dur, "args": {"grid": list(grid)}}


def test_shares_add_up_to_the_span_when_kernels_overlap():
    # a [0, 10); b starts early (PDL) and ends at 14: its share is 4 of its 9 us; c lies inside b: no share;
    # a second a [20, 25) after an idle gap: its share is 11, the gap counted to the kernel that ends it
    rows, span = span_shares([kernel("b", 5, 9, (8, 2, 1)), kernel("a", 0, 10), kernel("c", 6, 3), kernel("a", 20, 5)])
    got = {key: (share, dur, n) for key, share, dur, n in rows}
    assert span == 25
    assert got == {"a grid (1, 1, 1)": (21, 15, 2), "b grid (8, 2, 1)": (4, 9, 1), "c grid (1, 1, 1)": (0, 3, 1)}
    assert [r[0] for r in rows] == ["a grid (1, 1, 1)", "b grid (8, 2, 1)", "c grid (1, 1, 1)"]
    assert sum(r[1] for r in rows) == span
