"""Reading a daemon's /metrics over HTTP (tests and benchmarks): samples by name and
labels, summed; a scraper thread that reads it every second while a benchmark runs."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample of one scrape."""
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (http on loopback)
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def wait_for(url: str, ok: Callable[[Samples], bool], timeout: float = 10.0) -> Samples:
    """Scrape until ``ok(samples)`` (polled values reach the files within a second)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if ok(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


class Scraper:
    """Scrapes a /metrics every ``interval`` seconds from a thread, as Prometheus would
    (more often than its usual 15 s), while a benchmark runs; ``scrapes`` counts them."""

    def __init__(self, url: str, interval: float = 1.0) -> None:
        self.url, self.interval = url, interval
        self.scrapes = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        """Scrape at once, then every ``interval`` seconds until stopped."""
        while True:  # at once, then every interval
            with urllib.request.urlopen(self.url, timeout=5) as response:  # noqa: S310 (http on loopback)
                response.read()
            self.scrapes += 1
            if self.stopping.wait(self.interval):
                return

    def __enter__(self) -> Scraper:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stopping.set()
        self.thread.join()
