"""Handing events from the engine thread to the asyncio coroutines that stream them.

The engine thread produces a token for every row at every step; waking the event loop once
per token and row would cost the engine thread more than the tokens. So each request has an
`Inbox` that asks for a wake-up only when its consumer is not already due one, and all the
inboxes of one event loop share a `Mailbox` that makes at most one wake-up call per loop turn.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import weakref

_MAILBOXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Mailbox:
    """Wake-ups from the engine thread into one event loop, one per loop turn: while a wake-up
    is pending, further inboxes that got events just join it (a socket write per token and
    row would cost the engine thread more than the tokens)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self._lock = loop, threading.Lock()
        self._ready: list[asyncio.Event] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Mailbox:
        box = _MAILBOXES.get(loop)
        if box is None:
            box = _MAILBOXES[loop] = cls(loop)
        return box

    def notify(self, event: asyncio.Event) -> None:  # engine thread
        with self._lock:
            self._ready.append(event)
            if len(self._ready) > 1:
                return
        self.loop.call_soon_threadsafe(self._deliver)  # a closed loop raises: the engine cancels the row

    def _deliver(self) -> None:  # event-loop thread
        with self._lock:
            ready, self._ready = self._ready, []
        for event in ready:
            event.set()


class Inbox:
    """Events from the engine thread to one request's coroutine: the engine appends and asks
    for a wake-up only when the consumer is not already due one; the consumer takes everything
    that arrived, text joined (a slow reader gets fewer, larger deltas rather than lag)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.mailbox, self.items = Mailbox.of(loop), collections.deque()
        self.ready = asyncio.Event()
        self._lock = threading.Lock()
        self._woken = False

    def post(self, item) -> None:  # engine thread
        with self._lock:
            self.items.append(item)
            if self._woken:
                return
            self._woken = True
        self.mailbox.notify(self.ready)

    async def take(self) -> list:
        await self.ready.wait()
        with self._lock:
            items, self.items, self._woken = list(self.items), collections.deque(), False
            self.ready.clear()
        joined: list = []
        for item in items:
            if isinstance(item, str) and joined and isinstance(joined[-1], str):
                joined[-1] += item
            else:
                joined.append(item)
        return joined
