"""Rank 0's /metrics of every running job, scraped concurrently on one event loop.

Each round scrapes every target at once (bounded concurrency, a short connect timeout), so one slow pod never
delays the others; rounds come every `interval` seconds, stretched when there are more targets than
`per_second` allows. A scrape that changes what status shows hands the job to the caller (`on_change`).
Pod IPs are reached directly, never through an HTTP(S)_PROXY from the environment.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import aiohttp

from kubetune_operator import progress
from kubetune_operator.state import Key, State

log = logging.getLogger("kubetune.operator")
CONNECT_SECONDS, TOTAL_SECONDS = 1.0, 3.0
CONCURRENCY = 64


class Scraper:
    def __init__(self, state: State, on_change: Callable[[Key], None], interval: float,
                 per_second: float = 200.0) -> None:
        self.state, self.on_change = state, on_change
        self.interval, self.per_second = interval, per_second
        self.targets: dict[Key, str] = {}  # job -> rank 0's metrics URL
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._rounds(),),
                                       name="kubetune-scraper", daemon=True)

    def start(self) -> Scraper:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(10)

    def follow(self, key: Key, url: str | None) -> None:
        with self.lock:
            if url:
                self.targets[key] = url
            else:
                self.targets.pop(key, None)

    def round_seconds(self) -> float:
        """Every `interval`, or longer when there are more targets than `per_second` scrapes allow."""
        with self.lock:
            return max(self.interval, len(self.targets) / self.per_second)

    async def _rounds(self) -> None:
        timeout = aiohttp.ClientTimeout(total=TOTAL_SECONDS, sock_connect=CONNECT_SECONDS)
        connector = aiohttp.TCPConnector(limit=CONCURRENCY, force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector, trust_env=False) as session:
            while not self.stopped.is_set():
                started = self.loop.time()
                with self.lock:
                    targets = dict(self.targets)
                await asyncio.gather(*(self._scrape(session, key, url) for key, url in targets.items()))
                await asyncio.sleep(max(0.0, self.round_seconds() - (self.loop.time() - started)))

    async def _scrape(self, session: aiohttp.ClientSession, key: Key, url: str) -> None:
        try:
            async with session.get(url) as response:
                text = await response.text()
        except (aiohttp.ClientError, OSError, TimeoutError):
            return  # not up yet, or gone: progress is best effort
        found: tuple[dict[str, Any], dict[str, float]] = progress.parse(text, key[1], key[0])
        if self.state.set_scraped(key, found):
            self.on_change(key)
