"""One moving deadline per connection: fires once, late moves cost no new timer."""

from __future__ import annotations

import asyncio

from egress.deadline import Deadline


def test_fires_once_at_the_latest_deadline():
    async def scenario():
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        deadline = Deadline(loop, lambda: fired.append(loop.time()))
        start = loop.time()
        deadline.set(start + 0.05)
        deadline.set(start + 0.15)  # moved later: the pending timer re-arms when it fires
        await asyncio.sleep(0.3)
        return start, fired

    start, fired = asyncio.run(scenario())
    assert len(fired) == 1 and fired[0] - start >= 0.15


def test_earlier_deadline_and_clear():
    async def scenario():
        loop = asyncio.get_running_loop()
        fired: list[str] = []
        deadline = Deadline(loop, lambda: fired.append("fired"))
        deadline.set(loop.time() + 10)
        deadline.set(loop.time() + 0.02)  # earlier: re-armed at once
        await asyncio.sleep(0.06)
        deadline.set(loop.time() + 0.02)
        deadline.clear()
        await asyncio.sleep(0.06)
        return fired

    assert asyncio.run(scenario()) == ["fired"]
