"""Prometheus metrics shared by both daemons: how they are made, counted and served.

A daemon defines its own metrics through a :class:`Metrics` (``counter``, ``gauge``,
``histogram``) and records them on its hot paths; the core names none of them.  With
``metrics_listen`` empty (the default) a :class:`Metrics` hands out objects that record
nothing, so metrics off cost a method call.

Recording is a locked addition to a number in the worker's own memory (well under a
microsecond; prometheus-client's multiprocess mode writes an mmap file on every
increment, which cost the policy daemon over 15 % of its CPU per request).  Once a second
(:meth:`Metrics.publish`, from the daemon's event loop) each worker writes all its
values to one file of its own, ``<pid>.json``, in the exporter's directory, replacing
it atomically; at a clean exit it writes them once more.

With ``metrics_listen`` set, :func:`mailwarden.daemon.run_daemon` starts an
:class:`Exporter` before the workers exist: it makes a fresh directory (removed when
the daemon stops), names it in ``MAILWARDEN_METRICS_DIR`` for the workers, and serves
``/metrics`` on exactly the configured address from the process that forks them
(prometheus-client's HTTP server and metric families).  Each scrape adds up every
worker's file, so the numbers are the node's: counters and histograms of workers that
died stay in the sums (a restarted worker has a new pid and a new file, so the node's
counters never go back), while the gauges of a dead worker are dropped
(:meth:`Exporter.worker_died`).  A worker killed outright loses what it counted since its
last write, at most a second.

:class:`Poller` moves totals that a component keeps as plain integers (cache hits of
the policy resolver, of dnspython's cache) into counters once a second.
"""

from __future__ import annotations

import bisect
import contextlib
import ipaddress
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from mailwarden.directory import Directory, Entry
from mailwarden.store.base import Store, StoreCall, StoreWrapper

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

log = logging.getLogger("mailwarden.metrics")

T = TypeVar("T")

ENV = "MAILWARDEN_METRICS_DIR"
"""Where the exporter wants each worker's values (set before the workers start)."""
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds: from a cached answer (sub-millisecond) to a scanner's time limit."""
GAUGE_MODES = ("livesum", "livemax")
"""How the live workers' values of a gauge add up: their sum (things in progress) or the
largest (one value any worker measures for the node, such as the quarantine's size)."""


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


class Value:
    """One series of a counter or gauge in this process."""

    __slots__ = ("lock", "value")

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        """Add ``amount``."""
        with self.lock:
            self.value += amount

    def dec(self, amount: float = 1) -> None:
        """Subtract ``amount``."""
        with self.lock:
            self.value -= amount

    def set(self, value: float) -> None:
        """Set to ``value``."""
        self.value = value


class Buckets:
    """One series of a histogram in this process: counts per bucket (not cumulative) and sum."""

    __slots__ = ("bounds", "counts", "lock", "sum")

    def __init__(self, lock: threading.Lock, bounds: Sequence[float]) -> None:
        self.lock = lock
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        """Count ``amount`` in the first bucket whose bound is not below it."""
        i = bisect.bisect_left(self.bounds, amount)
        with self.lock:
            self.counts[i] += 1
            self.sum += amount


class Family:
    """A metric: its description and its series by label values."""

    def __init__(self, name: str, kind: str, doc: str, labels: Sequence[str], lock: threading.Lock, *,
                 mode: str = "", bounds: Sequence[float] = ()) -> None:
        self.name, self.kind, self.doc, self.labelnames = name, kind, doc, tuple(labels)
        self.mode = mode
        self.bounds = tuple(bounds)
        self.lock = lock
        self.series: dict[tuple[str, ...], Any] = {}
        if not self.labelnames:
            self.default = self.child(())

    def child(self, values: tuple[str, ...]) -> Any:
        """The series for ``values`` (made on first use)."""
        found = self.series.get(values)
        if found is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: {len(self.labelnames)} label values expected")
            found = Buckets(self.lock, self.bounds) if self.kind == "histogram" else Value(self.lock)
            with self.lock:
                found = self.series.setdefault(values, found)
        return found

    def labels(self, *values: str) -> Any:
        """The series for these label values."""
        return self.child(values)

    def inc(self, amount: float = 1) -> None:
        """Add to the unlabelled series."""
        self.default.inc(amount)

    def dec(self, amount: float = 1) -> None:
        """Subtract from the unlabelled series."""
        self.default.dec(amount)

    def set(self, value: float) -> None:
        """Set the unlabelled series."""
        self.default.set(value)

    def observe(self, amount: float) -> None:
        """Observe into the unlabelled series."""
        self.default.observe(amount)

    def snapshot(self) -> dict[str, Any]:
        """The family as JSON-ready data."""
        with self.lock:
            series = [[list(k), [*v.counts, v.sum] if self.kind == "histogram" else v.value]
                      for k, v in self.series.items()]
        return {"kind": self.kind, "doc": self.doc, "labels": list(self.labelnames), "mode": self.mode,
                "bounds": [b if math.isfinite(b) else "+Inf" for b in self.bounds], "series": series}


class Metrics:
    """Makes one daemon process's metrics (``on``) or stand-ins that record nothing.

    :attr:`registry` (prometheus-client) shows this process's values, for tests
    (``registry.get_sample_value``); :meth:`publish` writes them for the exporter.
    :attr:`defined` lists the metrics defined, as exported (``_total`` on counters);
    :meth:`exported` the sample names as scraped.
    """

    def __init__(self, on: bool = True, directory: str | None = None) -> None:
        self.on = on
        self.defined: dict[str, tuple[str, tuple[str, ...]]] = {}
        """Every metric defined: name -> (kind, label names)."""
        self.families: dict[str, Family] = {}
        self.lock = threading.Lock()
        self.directory = (os.environ.get(ENV, "") if directory is None else directory) if on else ""
        """Where :meth:`publish` writes (the exporter's directory; empty: nowhere)."""
        self.registry: CollectorRegistry | None = None
        if on:
            from prometheus_client import CollectorRegistry

            self.registry = CollectorRegistry()
            self.registry.register(SnapshotCollector(lambda: [(self.snapshot(), True)]))

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

    def _family(self, name: str, kind: str, doc: str, labels: Sequence[str], **kwargs: Any) -> Any:
        if name in self.defined:
            raise ValueError(f"metric {name} defined twice")
        self.defined[name] = (kind, tuple(labels))
        if not self.on:
            return NOTHING
        family = self.families[name] = Family(name, kind, doc, labels, self.lock, **kwargs)
        return family

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> CounterLike:
        """A counter called ``name`` (ending in ``_total``)."""
        if not name.endswith("_total"):
            raise ValueError(f"counter {name}: the name must end in _total")
        return self._family(name, "counter", doc, labels)  # type: ignore[no-any-return]

    def gauge(self, name: str, doc: str, labels: Sequence[str] = (), *, mode: str = "livesum") -> GaugeLike:
        """A gauge; ``mode`` (:data:`GAUGE_MODES`) says how the live workers' values add up."""
        if mode not in GAUGE_MODES:
            raise ValueError(f"gauge {name}: mode {mode!r} is not one of {', '.join(GAUGE_MODES)}")
        return self._family(name, "gauge", doc, labels, mode=mode)  # type: ignore[no-any-return]

    def histogram(self, name: str, doc: str, labels: Sequence[str] = (),
                  buckets: Sequence[float] = LATENCY_BUCKETS) -> HistogramLike:
        """A histogram of seconds (or of anything else with ``buckets``)."""
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        return self._family(name, "histogram", doc, labels, bounds=bounds)  # type: ignore[no-any-return]

    def snapshot(self) -> dict[str, Any]:
        """Every value of this process, as JSON-ready data."""
        return {name: family.snapshot() for name, family in self.families.items()}

    def publish(self) -> None:
        """Write this process's values for the exporter (``<pid>.json``, replaced at once)."""
        if not self.directory:
            return
        path = Path(self.directory) / f"{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.snapshot()), encoding="utf-8")
            tmp.replace(path)
        except OSError as exc:  # the daemon stopping removed the directory
            log.debug("metrics not written: %s", exc)


class SnapshotCollector:
    """A prometheus-client collector adding up snapshots (of several workers).

    ``snapshots()`` gives each worker's values and whether the worker is running.
    Counters and histograms are summed over every snapshot; gauges over the running
    workers' (by their mode: sum or largest).
    """

    def __init__(self, snapshots: Callable[[], Iterable[tuple[dict[str, Any], bool]]]) -> None:
        self.snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        """The merged families."""
        from prometheus_client.metrics_core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        merged: dict[str, dict[str, Any]] = {}
        for snapshot, live in self.snapshots():
            for name, family in snapshot.items():
                kind = family["kind"]
                if kind == "gauge" and not live:
                    continue
                into = merged.setdefault(name, {**family, "series": {}})
                for values, value in family["series"]:
                    key = tuple(values)
                    if kind == "histogram":
                        old = into["series"].get(key)
                        into["series"][key] = value if old is None else [a + b for a, b in zip(old, value,
                                                                                                 strict=True)]
                    elif kind == "gauge" and family["mode"] == "livemax":
                        into["series"][key] = max(into["series"].get(key, -math.inf), value)
                    else:
                        into["series"][key] = into["series"].get(key, 0.0) + value
        for name, family in sorted(merged.items()):
            kind, labels = family["kind"], family["labels"]
            metric: Any
            if kind == "counter":
                metric = CounterMetricFamily(name.removesuffix("_total"), family["doc"], labels=labels)
            elif kind == "gauge":
                metric = GaugeMetricFamily(name, family["doc"], labels=labels)
            else:
                metric = HistogramMetricFamily(name, family["doc"], labels=labels)
            for key, value in sorted(family["series"].items()):
                if kind == "histogram":
                    *counts, total = value
                    cumulative, buckets = 0, []
                    for bound, count in zip(family["bounds"], counts, strict=True):
                        cumulative += count
                        buckets.append((_le(bound), cumulative))
                    metric.add_metric(list(key), buckets, total)
                else:
                    metric.add_metric(list(key), value)
            yield metric


def _le(bound: float | str) -> str:
    """A bucket's ``le`` as Prometheus writes it (``0.005``, ``1.0``, ``+Inf``)."""
    return "+Inf" if bound == "+Inf" else repr(float(bound))


class Timer:
    """Times a block into a histogram; an exception counts in ``errors`` (a class, not a
    generator-based context manager: this runs around every backend call)."""

    __slots__ = ("errors", "histogram", "started")

    def __init__(self, histogram: HistogramLike, errors: CounterLike | None = None) -> None:
        self.histogram = histogram
        self.errors = errors
        self.started = 0.0

    def __enter__(self) -> Timer:
        self.started = time.perf_counter()
        return self

    def __exit__(self, kind: type[BaseException] | None, *_rest: object) -> None:
        self.histogram.observe(time.perf_counter() - self.started)
        if kind is not None and self.errors is not None:
            self.errors.inc()


class Backend:
    """The latency histogram and error counter of one backend (a labelled child each)."""

    def __init__(self, seconds: HistogramLike, errors: CounterLike) -> None:
        self.seconds = seconds
        self.errors = errors

    def timed(self) -> Timer:
        """Time a call to the backend (an exception counts as an error)."""
        return Timer(self.seconds, self.errors)

    def observe(self, seconds: float, failed: bool = False) -> None:
        """One call that took ``seconds`` (and failed)."""
        self.seconds.observe(seconds)
        if failed:
            self.errors.inc()


class DaemonMetrics:
    """What every daemon's metrics have: ``PREFIX_backend_seconds`` and
    ``PREFIX_backend_errors_total`` by backend, ``PREFIX_cache_requests_total`` by cache and
    result, and a :class:`Poller`; a daemon's own class adds its metrics."""

    def __init__(self, metrics: Metrics | None, prefix: str, caches: str) -> None:
        self.metrics = m = metrics if metrics is not None else Metrics(on=False)
        self.on = m.on
        self.backend_seconds = m.histogram(f"{prefix}_backend_seconds", "latency of calls to a backend",
                                           ["backend"])
        self.backend_errors = m.counter(f"{prefix}_backend_errors_total", "failed calls to a backend",
                                        ["backend"])
        self.cache = m.counter(f"{prefix}_cache_requests_total",
                               f"cache lookups by cache ({caches}) and result (hit/miss)",
                               ["cache", "result"])
        self.poller = Poller()

    def backend(self, name: str) -> Backend:
        """The latency histogram and error counter of one backend."""
        return Backend(self.backend_seconds.labels(name), self.backend_errors.labels(name))

    def publish(self) -> None:
        """Move the polled totals into their counters and write the values for the exporter."""
        self.poller.flush()
        self.metrics.publish()


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

    def domains_with(self, concept: str) -> list[Entry]:
        """Timed :meth:`Directory.domains_with`."""
        with self.backend.timed():
            return self.directory.domains_with(concept)

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
        self.seconds = backend.seconds
        self.errors = backend.errors

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except BaseException:
            self.errors.inc()
            raise
        finally:
            self.seconds.observe(time.perf_counter() - started)

    def call_many(self, calls: Sequence[StoreCall]) -> list[Any]:
        """Timed :meth:`Store.call_many <mailwarden.store.base.Store.call_many>` (one round
        trip, one observation); each operation that failed counts as an error."""
        results = self._call(self.store.call_many, calls)
        for result in results:
            if isinstance(result, Exception):
                self.errors.inc()
        return results


def dns_cache(resolver: object) -> tuple[Callable[[], int], Callable[[], int]] | None:
    """Readers of the hits and misses of a dnspython resolver's cache (None: no cache)."""
    import dns.resolver

    cache = getattr(resolver, "cache", None)
    if not isinstance(cache, dns.resolver.LRUCache | dns.resolver.Cache):
        return None
    return cache.hits, cache.misses


class Poller:
    """Adds what grew in integer totals (``read()``) to counters, at most once a second.

    :meth:`poll` is cheap to call often (a clock read); :meth:`flush` moves everything now
    (each second from the daemon's event loop, and before a worker ends).
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.sources: list[tuple[Callable[[], int], CounterLike, list[int]]] = []
        self.due = 0.0
        self.before: list[Callable[[], None]] = []
        """Run at the start of each :meth:`flush` (to read totals kept in another shape once)."""

    def add(self, read: Callable[[], int], counter: CounterLike) -> None:
        """Follow ``read()`` into ``counter`` from its value now on."""
        self.sources.append((read, counter, [read()]))

    def flush(self) -> None:
        """Move every increase into its counter."""
        for prepare in self.before:
            prepare()
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
    """``/metrics`` of one daemon on one node: the workers' directory and the HTTP server."""

    def __init__(self, listen: str, name: str) -> None:
        self.host, self.port = parse_listen(listen)
        self.name = name
        self.directory = ""
        self.server: WSGIServer | None = None
        self.thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens."""
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Make the directory, name it in ``MAILWARDEN_METRICS_DIR``, listen; OSError when
        the address cannot be bound (the directory is removed again)."""
        self.directory = tempfile.mkdtemp(prefix=f"mailwarden-{self.name}-metrics-")
        os.environ[ENV] = self.directory
        try:
            from prometheus_client import CollectorRegistry, start_http_server

            registry = CollectorRegistry()
            registry.register(SnapshotCollector(self.snapshots))
            self.server, self.thread = start_http_server(self.port, self.host, registry=registry)
        except BaseException:
            self.stop()
            raise
        log.info("%s: metrics on http://%s:%d/metrics", self.name, *self.address)

    def snapshots(self) -> Iterator[tuple[dict[str, Any], bool]]:
        """Every worker's last values, and whether it runs: ``PID.json`` of a running
        worker, ``PID.dead.json`` of a dead one (a file that cannot be read is skipped)."""
        for path in sorted(Path(self.directory).glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                yield json.loads(path.read_text(encoding="utf-8")), not path.name.endswith(".dead.json")

    def worker_died(self, pid: int) -> None:
        """Keep a dead worker's counters and histograms in the sums, drop its gauges."""
        path = Path(self.directory) / f"{pid}.json"
        with contextlib.suppress(FileNotFoundError):
            path.replace(path.with_suffix(".dead.json"))

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
