"""Prometheus metrics shared by both daemons: how they are made, counted and served.

A daemon defines its own metrics through a :class:`Metrics` (``counter``, ``gauge``,
``histogram``) and records them on its hot paths; the core names none of them.  With
``metrics_listen`` empty (the default) a :class:`Metrics` hands out objects that record
nothing, so metrics off cost a method call.

With ``metrics_listen`` set, :func:`mailwarden.daemon.run_daemon` starts an
:class:`Exporter` before the workers exist: it makes a fresh directory, points
``PROMETHEUS_MULTIPROC_DIR`` at it (prometheus-client's multiprocess mode: every worker
writes its values to files of its own there), serves ``/metrics`` over HTTP on exactly
the configured address from the process that forks the workers, and adds up every
worker's files on each scrape, so the numbers are the node's.  When a worker dies its
live gauges are dropped (``mark_process_dead``); its counters stay in the sum.  The
directory is removed when the daemon stops.

prometheus-client chooses multiprocess mode when it is first imported, so nothing
imports it before the exporter has set the directory: this module imports it inside
functions only.

:class:`Poller` moves totals that a component keeps as plain integers (cache hits of
the policy resolver, of dnspython's cache) into counters once a second, so those
lookups cost nothing extra per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from mailwarden.directory import Directory, Entry
from mailwarden.store.base import Store, StoreWrapper

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry

log = logging.getLogger("mailwarden.metrics")

T = TypeVar("T")

ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds: from a cached answer (sub-millisecond) to a scanner's time limit."""


class CounterLike(Protocol):
    """A counter, or a labelled child of one."""

    def labels(self, *values: str) -> CounterLike:
        """The child for these label values."""
        ...

    def inc(self, amount: float = 1) -> None:
        """Add ``amount``."""
        ...


class GaugeLike(Protocol):
    """A gauge, or a labelled child of one."""

    def labels(self, *values: str) -> GaugeLike:
        """The child for these label values."""
        ...

    def inc(self, amount: float = 1) -> None:
        """Add ``amount``."""
        ...

    def dec(self, amount: float = 1) -> None:
        """Subtract ``amount``."""
        ...

    def set(self, value: float) -> None:
        """Set to ``value``."""
        ...


class HistogramLike(Protocol):
    """A histogram, or a labelled child of one."""

    def labels(self, *values: str) -> HistogramLike:
        """The child for these label values."""
        ...

    def observe(self, amount: float) -> None:
        """Count one observation."""
        ...


class Nothing:
    """Every kind of metric when metrics are off: records nothing."""

    def labels(self, *values: str) -> Nothing:
        """Itself."""
        return self

    def inc(self, amount: float = 1) -> None:
        """Nothing."""

    def dec(self, amount: float = 1) -> None:
        """Nothing."""

    def set(self, value: float) -> None:
        """Nothing."""

    def observe(self, amount: float) -> None:
        """Nothing."""


NOTHING = Nothing()


class Metrics:
    """Makes one daemon process's metrics (``on``) or stand-ins that record nothing.

    Each instance has a registry of its own (:attr:`registry`), so tests can build several
    in one process and read values with ``registry.get_sample_value``; in a daemon with
    the exporter on, the values are also written to the multiprocess directory, which is
    what ``/metrics`` serves.  :attr:`defined` lists the metrics defined, as exported
    (``_total`` on counters); :meth:`exported` the sample names as scraped.
    """

    def __init__(self, on: bool = True) -> None:
        self.on = on
        self.defined: dict[str, tuple[str, tuple[str, ...]]] = {}
        """Every metric defined: name -> (kind, label names)."""
        self.registry: CollectorRegistry | None = None
        if on:
            from prometheus_client import CollectorRegistry

            self.registry = CollectorRegistry()

    def exported(self) -> dict[str, tuple[str, ...]]:
        """The sample names ``/metrics`` shows (``_bucket``, ``_sum`` and ``_count`` of a
        histogram, ``le`` among its bucket's labels) with their label names."""
        out: dict[str, tuple[str, ...]] = {}
        for name, (kind, labels) in self.defined.items():
            if kind == "histogram":
                out[name + "_bucket"] = (*labels, "le")
                out[name + "_sum"] = out[name + "_count"] = labels
            else:
                out[name] = labels
        return out

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> CounterLike:
        """A counter called ``name`` (ending in ``_total``)."""
        if not name.endswith("_total"):
            raise ValueError(f"counter {name}: the name must end in _total")
        self.defined[name] = ("counter", tuple(labels))
        if self.registry is None:
            return NOTHING
        from prometheus_client import Counter

        return Counter(name.removesuffix("_total"), doc, labels, registry=self.registry)

    def gauge(self, name: str, doc: str, labels: Sequence[str] = (), *, mode: str = "livesum") -> GaugeLike:
        """A gauge; ``mode`` says how the workers' values add up (prometheus-client's
        ``multiprocess_mode``: ``livesum`` for things in progress, ``mostrecent`` for one
        value any worker measures for the node)."""
        self.defined[name] = ("gauge", tuple(labels))
        if self.registry is None:
            return NOTHING
        from prometheus_client import Gauge

        return Gauge(name, doc, labels, registry=self.registry, multiprocess_mode=mode)  # type: ignore[arg-type]

    def histogram(self, name: str, doc: str, labels: Sequence[str] = (),
                  buckets: Sequence[float] = LATENCY_BUCKETS) -> HistogramLike:
        """A histogram of seconds (or of anything else with ``buckets``)."""
        self.defined[name] = ("histogram", tuple(labels))
        if self.registry is None:
            return NOTHING
        from prometheus_client import Histogram

        return Histogram(name, doc, labels, registry=self.registry, buckets=buckets)


@contextlib.contextmanager
def timed(histogram: HistogramLike, errors: CounterLike | None = None) -> Iterator[None]:
    """Observe how long the block took; count it in ``errors`` when it raised."""
    started = time.perf_counter()
    try:
        yield
    except BaseException:
        if errors is not None:
            errors.inc()
        raise
    finally:
        histogram.observe(time.perf_counter() - started)


class Backend:
    """The latency histogram and error counter of one backend (a labelled child each)."""

    def __init__(self, seconds: HistogramLike, errors: CounterLike) -> None:
        self.seconds = seconds
        self.errors = errors

    def timed(self) -> contextlib.AbstractContextManager[None]:
        """Time a call to the backend (an exception counts as an error)."""
        return timed(self.seconds, self.errors)

    def observe(self, seconds: float, failed: bool = False) -> None:
        """One call that took ``seconds`` (and failed)."""
        self.seconds.observe(seconds)
        if failed:
            self.errors.inc()


class TimedDirectory:
    """A Directory whose calls are timed and whose failures are counted."""

    def __init__(self, directory: Directory, backend: Backend) -> None:
        self.directory = directory
        self.backend = backend

    def find_domain(self, domain: str) -> Entry | None:
        """Timed :meth:`Directory.find_domain`."""
        with self.backend.timed():
            return self.directory.find_domain(domain)

    def find_user(self, address: str, domain: Entry) -> Entry | None:
        """Timed :meth:`Directory.find_user`."""
        with self.backend.timed():
            return self.directory.find_user(address, domain)

    def modify(self, dn: str, changes: Any) -> None:
        """Timed :meth:`Directory.modify`."""
        with self.backend.timed():
            self.directory.modify(dn, changes)

    def ping(self) -> None:
        """Timed :meth:`Directory.ping`."""
        with self.backend.timed():
            self.directory.ping()


class TimedStore(StoreWrapper):
    """A Store whose calls are timed and whose failures are counted."""

    def __init__(self, store: Store, backend: Backend) -> None:
        super().__init__(store)
        self.backend = backend

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self.backend.timed():
            return fn(*args, **kwargs)


def dns_cache(resolver: object) -> tuple[Callable[[], int], Callable[[], int]] | None:
    """Readers of the hits and misses of a dnspython resolver's cache (None: no cache)."""
    import dns.resolver

    cache = getattr(resolver, "cache", None)
    if not isinstance(cache, dns.resolver.LRUCache | dns.resolver.Cache):
        return None
    return cache.hits, cache.misses


class Poller:
    """Adds what grew in integer totals (``read()``) to counters, at most once a second.

    :meth:`poll` is cheap to call often (a clock read); :meth:`run` polls on an event
    loop; :meth:`flush` moves everything now (before a worker ends).
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.sources: list[tuple[Callable[[], int], CounterLike, list[int]]] = []
        self.due = 0.0

    def add(self, read: Callable[[], int], counter: CounterLike) -> None:
        """Follow ``read()`` into ``counter`` from its value now on."""
        self.sources.append((read, counter, [read()]))

    def flush(self) -> None:
        """Move every increase into its counter."""
        for read, counter, last in self.sources:
            value = read()
            if value > last[0]:
                counter.inc(value - last[0])
            last[0] = value

    def poll(self, now: float | None = None) -> None:
        """:meth:`flush` when the interval has passed."""
        now = time.monotonic() if now is None else now
        if now >= self.due:
            self.due = now + self.interval
            self.flush()

    async def run(self) -> None:
        """Flush every ``interval`` seconds until cancelled."""
        try:
            while True:
                await asyncio.sleep(self.interval)
                self.flush()
        finally:
            self.flush()


def parse_listen(spec: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` -> (host, port); ValueError saying what is expected.

    The host is an IP address or ``localhost``: the address is bound exactly as given.
    """
    host, sep, port = spec.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{spec!r}: expected host:port (e.g. 127.0.0.1:9101)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{spec!r}: the host must be an IP address or localhost") from None
    return host, int(port)


def check_listen(section: str, spec: str) -> list[str]:
    """Problems with a ``metrics_listen`` value (empty: off, fine)."""
    if not spec:
        return []
    try:
        parse_listen(spec)
    except ValueError as exc:
        return [f"{section}.metrics_listen: {exc}"]
    return []


class Exporter:
    """``/metrics`` of one daemon on one node: the multiprocess directory and the HTTP server."""

    def __init__(self, listen: str, name: str) -> None:
        self.host, self.port = parse_listen(listen)
        self.name = name
        self.directory = ""
        self.server: WSGIServer | None = None
        self.thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the port is the real one when 0 was configured)."""
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Make the directory, set ``PROMETHEUS_MULTIPROC_DIR``, listen; OSError when the
        address cannot be bound (the directory is removed again)."""
        self.directory = tempfile.mkdtemp(prefix=f"mailwarden-{self.name}-metrics-")
        os.environ[ENV] = self.directory
        try:
            from prometheus_client import CollectorRegistry, start_http_server
            from prometheus_client.multiprocess import MultiProcessCollector

            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.directory)  # type: ignore[no-untyped-call]
            self.server, self.thread = start_http_server(self.port, self.host, registry=registry)
        except BaseException:
            self.stop()
            raise
        log.info("%s: metrics on http://%s:%d/metrics", self.name, *self.address)

    def worker_died(self, pid: int) -> None:
        """Forget a dead worker's live gauges (its counters stay in the node's sums)."""
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]

    def after_fork(self) -> None:
        """In a new worker: the listening socket is the parent's alone."""
        if self.server is not None:
            self.server.socket.close()

    def stop(self) -> None:
        """Stop serving; remove the directory."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        if self.directory:
            if os.environ.get(ENV) == self.directory:
                del os.environ[ENV]
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = ""
