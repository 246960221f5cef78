"""Relay flow control: the upstream is read only as fast as the client drains.

Contract: the client protocol calls `pause()` / `resume()` from its `pause_writing()` /
`resume_writing()` (driven by the write-buffer high and low water marks set on its transport);
`attach()` binds the upstream transport currently feeding that client and `detach()` releases it
reading again. Every call is safe to repeat. While paused, the provider's bytes wait in its own
socket buffers, so a slow reader costs egress at most one high-water mark of memory.
"""

from __future__ import annotations

import asyncio


class Backpressure:
    __slots__ = ("_upstream", "_upstream_paused", "client_paused")

    def __init__(self) -> None:
        self.client_paused = False
        self._upstream: asyncio.Transport | None = None
        self._upstream_paused = False

    def pause(self) -> None:
        self.client_paused = True
        self._pause_upstream()

    def resume(self) -> None:
        self.client_paused = False
        if self._upstream is not None and self._upstream_paused:
            self._upstream_paused = False
            if not self._upstream.is_closing():
                self._upstream.resume_reading()

    def attach(self, upstream: asyncio.Transport) -> None:
        self._upstream = upstream
        self._upstream_paused = False
        if self.client_paused:
            self._pause_upstream()

    def detach(self) -> None:
        upstream = self._upstream
        self._upstream = None
        if upstream is not None and self._upstream_paused and not upstream.is_closing():
            # A pooled connection must be read again, or its close by the provider goes unseen.
            upstream.resume_reading()
        self._upstream_paused = False

    def _pause_upstream(self) -> None:
        if self._upstream is not None and not self._upstream_paused and not self._upstream.is_closing():
            self._upstream_paused = True
            self._upstream.pause_reading()
