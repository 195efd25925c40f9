"""Server choice for the OpenAI-compatible engine: a small health table per server.

Every attempt of every request asks the `Fleet` for a server: the next one round-robin that is not
cooling down. A connection error, a timeout or a retryable status (429, 5xx...) cools the server
down for `backoff_s * 2**k` seconds (k: its consecutive failed episodes, capped at `cooldown_s`),
or for as long as its `Retry-After` header asks (capped at `max_retry_after_s`), whichever is
longer; any answer that shows the server working resets it. So the requests of a dead server fail
over to the others within their retry budget, and the dead server is tried again only now and then.
When every server is cooling down, an attempt waits for the one that comes back first.

The table lives on the engine, so a server found dead in one chunk is still avoided in the next.
Failures of requests already in flight when the server was cooled down do not lengthen its
cool-down: only a server tried again after its cool-down and failing again cools down for longer.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from datetime import timezone
from email.utils import parsedate_to_datetime

import httpx


@dataclass
class Server:
    base_url: str  # without user:password@ (those travel as `auth`)
    auth: httpx.BasicAuth | None
    shown: str  # the URL fit to print: no credentials
    failures: int = 0  # consecutive cool-down episodes; 0: healthy
    cool_until: float = 0.0  # time.monotonic() before which it is not tried
    attempts: int = 0  # requests sent to it (all time)


class Fleet:
    def __init__(self, servers: list[Server], *, backoff_s: float, cooldown_s: float, max_retry_after_s: float,
                 clock=time.monotonic):
        self.servers = servers
        self.backoff_s = backoff_s
        self.cooldown_s = cooldown_s
        self.max_retry_after_s = max_retry_after_s
        self.clock = clock
        self._next = 0

    def pick(self) -> Server | None:
        """The next server round-robin that is not cooling down; None when all are."""
        now = self.clock()
        for step in range(len(self.servers)):
            index = (self._next + step) % len(self.servers)
            server = self.servers[index]
            if server.cool_until <= now:
                self._next = index + 1
                server.attempts += 1
                return server
        return None

    async def acquire(self) -> Server:
        """A server for the next attempt, waiting while every server cools down. Each wait ends when
        some server's cool-down does, and cool-downs are bounded, so this ends; a server is cooled
        again only by an attempt that failed, so some attempt makes progress meanwhile."""
        while (server := self.pick()) is None:
            earliest = min(s.cool_until for s in self.servers)
            wait = max(earliest - self.clock(), 0.001) + random.random() * self.backoff_s * 0.5  # spread the herd
            await asyncio.sleep(min(wait, max(self.cooldown_s, self.max_retry_after_s) + self.backoff_s))
        return server

    def failed(self, server: Server, retry_after_s: float | None = None) -> float:
        """Cool `server` down after a failed attempt; returns the cool-down in seconds from now."""
        now = self.clock()
        if server.cool_until <= now:  # a fresh episode; failures of attempts sent earlier do not stack
            server.failures += 1
            cool = min(self.backoff_s * 2 ** (server.failures - 1), self.cooldown_s)
            server.cool_until = now + cool
        if retry_after_s is not None:
            server.cool_until = max(server.cool_until, now + min(retry_after_s, self.max_retry_after_s))
        return server.cool_until - now

    def succeeded(self, server: Server) -> None:
        server.failures = 0
        server.cool_until = 0.0


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds a `Retry-After` header asks to wait: a number of seconds or an HTTP-date. None when
    absent or unreadable; never negative."""
    if not value or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:  # "-0000": UTC all the same
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(seconds, 0.0)
