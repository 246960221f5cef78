"""Count-min sketch and sliding window: never under-count, over-count within the documented bound."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress.sketch import CountMinSketch, SlidingWindow


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=1, max_size=8), st.integers(1, 50)), max_size=300))
def test_never_under_counts(events):
    sketch = CountMinSketch(width=16, depth=3)  # tiny on purpose: collisions everywhere
    truth: Counter[bytes] = Counter()
    for key, amount in events:
        sketch.add(sketch.slots(key), amount)
        truth[key] += amount
    for key, count in truth.items():
        assert sketch.estimate(sketch.slots(key)) >= count


def zipf_workload(keys: int, events: int, exponent: float, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    weights = [1 / (rank**exponent) for rank in range(1, keys + 1)]
    names = [f"key-{rank}".encode() for rank in range(keys)]
    return rng.choices(names, weights=weights, k=events)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_over_count_stays_within_epsilon_n_on_a_zipf_workload(seed):
    sketch = CountMinSketch(width=2048, depth=4)
    stream = zipf_workload(keys=20_000, events=200_000, exponent=1.1, seed=seed)
    truth = Counter(stream)
    for key in stream:
        sketch.add(sketch.slots(key), 1)
    bound = sketch.epsilon * len(stream)  # e/2048 · 200k ≈ 265
    errors = [sketch.estimate(sketch.slots(key)) - count for key, count in truth.items()]
    assert min(errors) >= 0
    share_beyond = sum(error > bound for error in errors) / len(errors)
    assert share_beyond <= sketch.delta, f"{share_beyond:.4f} of keys beyond ε·N; δ = {sketch.delta:.4f}"
    # The conservative update does far better than the worst case on the heavy keys that matter.
    heavy = [key for key, _ in truth.most_common(100)]
    assert max(sketch.estimate(sketch.slots(key)) - truth[key] for key in heavy) < bound / 4


def test_default_size_is_about_a_mebibyte_for_two_windows():
    assert SlidingWindow.bytes_needed(32768, 4) == 1024 * 1024 + 16
    assert CountMinSketch(32768, 4).epsilon == pytest.approx(8.3e-5, rel=0.01)


def test_two_windows_over_one_shared_buffer_agree():
    import mmap

    shared = mmap.mmap(-1, SlidingWindow.bytes_needed(1024, 4))
    first = SlidingWindow(width=1024, depth=4, window=60, buffer=memoryview(shared))
    second = SlidingWindow(width=1024, depth=4, window=60, buffer=memoryview(shared))
    slots = first.slots(b"kid-1")
    first.add(slots, 5, now=10)
    second.add(slots, 7, now=20)
    assert first.estimate(slots, now=30) == second.estimate(slots, now=30) == 12
    second.add(slots, 1, now=61)  # a new window, started by the other one
    assert first.estimate(slots, now=61) == pytest.approx(1 + 12 * (59 / 60))


def test_sliding_window_weighs_the_previous_window():
    window = SlidingWindow(width=1024, depth=4, window=60)
    slots = window.slots(b"kid-1")
    window.add(slots, 100, now=10)
    assert window.estimate(slots, now=59) == 100
    assert window.estimate(slots, now=60) == pytest.approx(100)  # rotated: all of it still overlaps
    assert window.estimate(slots, now=90) == pytest.approx(50)
    window.add(slots, 20, now=90)
    assert window.estimate(slots, now=90) == pytest.approx(70)
    assert window.estimate(slots, now=125) == pytest.approx(20 * (1 - 5 / 60))
    assert window.estimate(slots, now=300) == 0  # idle for two windows


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 500), st.integers(0, 500), st.integers(1, 400), st.floats(0, 59.9))
def test_seconds_until_below_is_when_the_count_drops(previous, current, limit, offset):
    window = SlidingWindow(width=1024, depth=4, window=60)
    slots = window.slots(b"k")
    window.add(slots, previous, now=0)
    window.add(slots, current, now=60)  # rotates: `previous` is now the previous window
    now = 60 + offset
    wait = window.seconds_until_below(slots, limit, now)
    assert wait >= 0

    def estimate_at(moment: float) -> float:
        probe = SlidingWindow(width=1024, depth=4, window=60)
        probe_slots = probe.slots(b"k")
        probe.add(probe_slots, previous, now=0)
        probe.add(probe_slots, current, now=60)
        return probe.estimate(probe_slots, moment)

    assert estimate_at(now + wait + 1e-6) <= limit + 1e-6
    if wait > 0.01:
        assert estimate_at(now + wait - 0.01) > limit - 1e-6


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([b"a", b"b", b"c"]), st.floats(0.0, 50.0), st.integers(0, 6)),
        min_size=1,
        max_size=60,
    )
)
def test_take_is_estimate_then_add_in_one_pass(steps):
    """The limiter's hot path against the two calls it replaces, over windows that turn over."""
    fused, plain = SlidingWindow(64, 4, 60.0), SlidingWindow(64, 4, 60.0)
    now = 1000.0
    for key, advance, limit in steps:
        now += advance
        slots = fused.slots(key)
        used = plain.estimate(slots, now)
        if limit and used > limit - 0.5:  # the previous window's share rounded to whole events
            expected = used
        else:
            plain.add(slots, 1, now)
            expected = None
        assert fused.take(slots, now, limit) == pytest.approx(expected)
        assert fused.estimate(slots, now) == pytest.approx(plain.estimate(slots, now))
