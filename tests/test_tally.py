"""The host's tally (slabs of shared memory, one per worker) and the SSE event count the metrics keep."""

from __future__ import annotations

import mmap
import os
import re
import subprocess
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress.metrics import MODEL_CAP, Metrics, alive, sse_events
from egress.tally import Tally, read_slabs, slab_bytes, slab_of, sum_counters
from egress.usage import Usage
from tests.replay import load_recordings
from tests.support import cut_into

STREAMS = {name: recording.body for name, recording in load_recordings().items() if recording.streaming}


def test_a_restarted_worker_goes_on_from_its_predecessors_counts():
    shared = memoryview(mmap.mmap(-1, slab_bytes() * 2))
    first = Tally(slab_of(shared, 2, 1), pid=101)
    at = first.index(("provider", "openai", "chat"), 5)
    first.values[at + 2] += 7
    first.add(("tokens", "openai", "gpt", "input"), 40)
    del first  # the worker dies: nothing was flushed, and nothing needed to be

    second = Tally(slab_of(shared, 2, 1), pid=202)
    assert second.index(("provider", "openai", "chat"), 5) == at
    assert second.get(("tokens", "openai", "gpt", "input")) == 40
    second.add(("tokens", "openai", "gpt", "input"), 2)
    second.add(("tokens", "openai", "gpt", "output"), 3)
    slabs = read_slabs(shared, 2)
    assert [slab.pid for slab in slabs] == [0, 202]  # worker 0 never started
    assert slabs[1].counters[("provider", "openai", "chat")] == [0, 0, 7, 0, 0]
    assert slabs[1].counters[("tokens", "openai", "gpt", "input")] == [42]


def test_counters_are_summed_over_the_workers_and_gauges_kept_apart():
    shared = memoryview(mmap.mmap(-1, slab_bytes() * 3))
    tallies = [Tally(slab_of(shared, 3, index), pid=1000 + index) for index in range(3)]
    for index, tally in enumerate(tallies):
        for _ in range(index + 1):
            tally.add(("busy", "openai"))
        tally.values[tally.index(("provider", "anthropic", "passthrough"), 3) + 1] += 10 * index
        tally.set_gauge(("open_connections",), index * 5)
    tallies[2].add(("busy", "groq"), 4)
    tallies[1].retire()
    slabs = read_slabs(shared, 3)
    totals = sum_counters(slabs)
    assert totals[("busy", "openai")] == [6]
    assert totals[("busy", "groq")] == [4]
    assert totals[("provider", "anthropic", "passthrough")] == [0, 30, 0]
    assert [slab.gauges[("open_connections",)] for slab in slabs] == [0, 5, 10]
    assert [slab.pid for slab in slabs] == [1000, 0, 1002]  # worker 1 left: its gauges are not read
    assert ("open_connections",) not in totals


def test_the_model_cap_is_the_hosts_whichever_worker_meets_a_model():
    shared = memoryview(mmap.mmap(-1, slab_bytes() * 2))
    workers = [Metrics(Tally(slab_of(shared, 2, index), pid=1000 + index)) for index in range(2)]
    for metrics in workers:
        metrics.see_host(shared, 2)
    for index in range(2 * MODEL_CAP):  # alternately, as the kernel spreads connections
        usage = Usage()
        usage.model, usage.input_tokens = f"model-{index}", 1
        workers[index % 2].observe_usage("local", usage)
    again = Usage()
    again.model, again.input_tokens = "model-1", 1  # a label worker 1 made, met by worker 0
    workers[0].observe_usage("local", again)
    totals = sum_counters(read_slabs(shared, 2))
    labels = {key[2] for key in totals if key[:2] == ("tokens", "local")}
    assert len(labels - {"other"}) == MODEL_CAP and "other" in labels
    assert totals[("tokens", "local", "model-1")][0] == 2
    assert sum(values[0] for key, values in totals.items() if key[:2] == ("tokens", "local")) == 2 * MODEL_CAP + 1
    # A restarted worker counts its predecessor's labels again, never the `other` bucket as one.
    restarted = Metrics(Tally(slab_of(shared, 2, 0), pid=2000))
    assert restarted._models["local"] == {f"model-{index}" for index in range(0, MODEL_CAP, 2)} | {"model-1"}


def test_a_full_slab_counts_what_it_could_not_keep_and_never_raises():
    tally = Tally(bytearray(slab_bytes(16, 256)))
    kept = refused = 0
    for index in range(200):
        tally.add(("tokens", "openai", f"model-{index}", "input"), 1)
        if tally.get(("tokens", "openai", f"model-{index}", "input")) == 1:
            kept += 1
        else:
            refused += 1
    (slab,) = read_slabs(memoryview(tally._buffer), 1)
    assert kept == len(slab.counters) and refused > 0
    assert slab.overflow == tally.overflow_keys == refused
    assert all(values == [1] for values in slab.counters.values())  # the spare cell is never read


def reference_events(stream: bytes) -> int:
    """Events the way an SSE reader dispatches them: a blank line after at least one line."""
    return len([block for block in re.split(rb"\r?\n\r?\n", stream) if block.strip(b"\r\n")]) - (
        0 if re.search(rb"\r?\n\r?\n$", stream) else 1
    )


def counted(chunks) -> int:
    total, end = 0, b""
    for chunk in chunks:
        events, end = sse_events(end, chunk)
        total += events
    return total


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_the_event_count_of_each_recorded_stream_whole_and_byte_by_byte(name):
    stream = STREAMS[name]
    expected = reference_events(stream)
    assert expected > 0
    assert counted([stream]) == expected
    assert counted([stream[i : i + 1] for i in range(len(stream))]) == expected
    crlf = stream.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert counted([crlf]) == counted([crlf[i : i + 1] for i in range(len(crlf))]) == expected


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(STREAMS)), st.lists(st.integers(min_value=1, max_value=97), max_size=60))
def test_the_event_count_is_the_same_however_the_stream_is_cut(name, sizes):
    stream = STREAMS[name]
    assert counted([piece for piece in cut_into(stream, sizes) if piece]) == counted([stream])


def test_a_worker_is_alive_only_as_a_sibling_never_as_a_reused_pid():
    # This process stands in for the supervisor: its children are the workers.
    sibling = subprocess.Popen(["sleep", "30"])
    try:
        assert alive(os.getpid()) and not alive(0)
        # Seen from here, a child is not a sibling: what a worker's old pid, taken by a process that
        # is not the supervisor's child, looks like to a worker.
        assert not alive(sibling.pid)
        # Seen from another child of this process, it is one.
        reader = os.fork()
        if reader == 0:
            os._exit(0 if alive(sibling.pid) else 1)
        _, status = os.waitpid(reader, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        sibling.kill()
        sibling.wait()
    reader = os.fork()
    if reader == 0:
        os._exit(1 if alive(sibling.pid) else 0)  # gone, reaped: not alive
    _, status = os.waitpid(reader, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_worker_that_died_unreaped_is_not_alive():
    # A child of this test (the supervisor) that has exited and is not reaped yet: a zombie.
    dead = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(f"/proc/{dead.pid}/stat", "rb") as fh:
            if fh.read().rpartition(b")")[2].split()[0] == b"Z":
                break
        time.sleep(0.01)
    reader = os.fork()
    if reader == 0:
        os._exit(1 if alive(dead.pid) else 0)  # a sibling of the reader, but a zombie
    _, status = os.waitpid(reader, 0)
    dead.wait()
    assert os.waitstatus_to_exitcode(status) == 0
