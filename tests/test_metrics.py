"""The core's metrics plumbing: metrics on and off, the multiprocess exporter, polling, ``top``."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.fakes import FakeDirectory
from harness.ports import free_port
from mailwarden.metrics import (
    NOTHING,
    Backend,
    Metrics,
    Poller,
    TimedDirectory,
    TimedStore,
    check_listen,
    parse_listen,
)
from mailwarden.store import MemoryStore, StoreCall
from mailwarden.top import Scrape, parse, quantile, render


def test_metrics_off_hand_out_objects_that_record_nothing() -> None:
    m = Metrics(on=False)
    counter = m.counter("x_total", "doc", ["a"])
    assert counter is NOTHING and counter.labels("v") is NOTHING
    m.histogram("h_seconds", "doc").observe(1.0)
    m.gauge("g", "doc").set(3)
    assert m.registry is None
    assert m.exported() == {"x_total": ("a",), "h_seconds_bucket": ("le",), "h_seconds_sum": (),
                            "h_seconds_count": (), "g": ()}


def test_metrics_on_record_in_their_own_registry() -> None:
    m = Metrics(directory="")
    m.counter("mw_things_total", "doc", ["kind"]).labels("a").inc(2)
    m.histogram("mw_call_seconds", "doc").observe(0.003)
    assert m.registry is not None
    assert m.registry.get_sample_value("mw_things_total", {"kind": "a"}) == 2
    assert m.registry.get_sample_value("mw_call_seconds_count") == 1
    with pytest.raises(ValueError, match="_total"):
        m.counter("mw_things", "doc")


def test_a_timed_directory_counts_calls_and_failures() -> None:
    m = Metrics()
    seconds = m.histogram("d_seconds", "doc", ["backend"])
    errors = m.counter("d_errors_total", "doc", ["backend"])
    directory = FakeDirectory()
    directory.add_domain("example.jp")
    timed = TimedDirectory(directory, Backend(seconds.labels("ldap"), errors.labels("ldap")))
    assert timed.find_domain("example.jp") is not None
    directory.down = True
    with pytest.raises(Exception):  # noqa: B017 (whatever the fake raises)
        timed.find_domain("example.jp")
    assert m.registry is not None
    assert m.registry.get_sample_value("d_seconds_count", {"backend": "ldap"}) == 2
    assert m.registry.get_sample_value("d_errors_total", {"backend": "ldap"}) == 1


def test_a_timed_store_times_operations_made_together_once_and_counts_each_failure() -> None:
    m = Metrics()
    seconds = m.histogram("s_seconds", "doc", ["backend"])
    errors = m.counter("s_errors_total", "doc", ["backend"])
    memory = MemoryStore()
    memory.sadd("members", "m")
    timed = TimedStore(memory, Backend(seconds.labels("store"), errors.labels("store")))
    results = timed.call_many([StoreCall("set", ("k", "v")),
                               StoreCall("incr_many", ([("members", 1, None)],)),
                               StoreCall("get", ("members",))])
    assert results[0] is None and isinstance(results[1], TypeError) and isinstance(results[2], TypeError)
    assert m.registry is not None
    assert m.registry.get_sample_value("s_seconds_count", {"backend": "store"}) == 1
    assert m.registry.get_sample_value("s_errors_total", {"backend": "store"}) == 2


def test_the_poller_moves_what_grew_once_per_interval() -> None:
    m = Metrics()
    hits = m.counter("p_hits_total", "doc")
    source = {"n": 5}
    poller = Poller(interval=1.0)
    poller.add(lambda: source["n"], hits)  # counts from 5 on
    source["n"] = 8
    poller.poll(now=100.0)
    source["n"] = 9
    poller.poll(now=100.5)  # not yet due
    assert m.registry is not None
    assert m.registry.get_sample_value("p_hits_total") == 3
    poller.flush()
    assert m.registry.get_sample_value("p_hits_total") == 4


@pytest.mark.parametrize(("spec", "expected"), [("127.0.0.1:9101", ("127.0.0.1", 9101)),
                                                ("[::1]:9102", ("::1", 9102)),
                                                ("localhost:80", ("localhost", 80))])
def test_listen_addresses(spec: str, expected: tuple[str, int]) -> None:
    assert parse_listen(spec) == expected
    assert check_listen("milter", spec) == []


@pytest.mark.parametrize("spec", ["9101", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000",
                                  "metrics.example:9101", "inet:127.0.0.1:9101"])
def test_bad_listen_addresses_are_refused(spec: str) -> None:
    (problem,) = check_listen("policyd", spec)
    assert problem.startswith("policyd.metrics_listen: ")
    assert check_listen("policyd", "") == []


EXPORTER = textwrap.dedent("""
    import os, sys, urllib.request
    from mailwarden.metrics import ENV, Exporter, Metrics

    exporter = Exporter(sys.argv[1], "test")
    exporter.start()
    assert os.environ[ENV] == exporter.directory
    pids = []
    for worker in range(2):
        pid = os.fork()
        if pid == 0:
            exporter.after_fork()
            m = Metrics()
            m.counter("mw_work_total", "doc", ["kind"]).labels("a").inc(worker + 1)
            m.gauge("mw_busy", "doc").set(1)
            m.histogram("mw_call_seconds", "doc", buckets=(0.1, 1.0)).observe(0.5 * (worker + 1))
            m.publish()
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    before = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics").read().decode()
    exporter.worker_died(pids[0])
    after = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics").read().decode()
    directory = exporter.directory
    exporter.stop()
    print(before, "----", after, "----", os.path.exists(directory), ENV in os.environ)
""")


def test_the_exporter_adds_up_every_worker_and_forgets_dead_ones_gauges(tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    script = tmp_path / "exporter.py"
    script.write_text(EXPORTER)
    result = subprocess.run([sys.executable, str(script), listen], capture_output=True, text=True, timeout=30,
                            check=False, env={"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path),
                                              "PYTHONPATH": ":".join(sys.path)})
    assert result.returncode == 0, result.stderr
    before, after, tail = result.stdout.split("----")
    assert 'mw_work_total{kind="a"} 3.0' in before and "mw_busy 2.0" in before
    assert 'mw_call_seconds_bucket{le="0.1"} 0.0' in before
    assert 'mw_call_seconds_bucket{le="1.0"} 2.0' in before  # 0.5 and 1.0
    assert 'mw_call_seconds_bucket{le="+Inf"} 2.0' in before and "mw_call_seconds_sum 1.5" in before
    assert "# TYPE mw_call_seconds histogram" in before and "# TYPE mw_work_total counter" in before
    # The dead worker's counter and histogram stay in the sums; its gauge goes.
    assert 'mw_work_total{kind="a"} 3.0' in after and "mw_busy 1.0" in after
    assert "mw_call_seconds_count 2.0" in after
    assert tail.split() == ["False", "False"]  # the directory and the variable are gone


def test_gauges_add_up_by_their_mode() -> None:
    from mailwarden.metrics import SnapshotCollector

    workers = []
    for size in (3, 5):
        m = Metrics(directory="")
        m.gauge("mw_open", "doc").set(size)
        m.gauge("mw_queue", "doc", mode="livemax").set(size * 10)
        workers.append(m.snapshot())
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(SnapshotCollector(lambda: [(w, True) for w in workers]))
    assert registry.get_sample_value("mw_open") == 8
    assert registry.get_sample_value("mw_queue") == 50
    with pytest.raises(ValueError, match="mode"):
        Metrics().gauge("mw_x", "doc", mode="mostrecent")


TEXT = """\
# TYPE mw_messages_total counter
mw_messages_total{verdict="accept"} 10
mw_messages_total{verdict="reject"} 2
# TYPE mw_cache_requests_total counter
mw_cache_requests_total{cache="policy",result="hit"} 30
mw_cache_requests_total{cache="policy",result="miss"} 10
# TYPE mw_backend_seconds histogram
mw_backend_seconds_bucket{backend="clamd",le="0.01"} 0
mw_backend_seconds_bucket{backend="clamd",le="0.1"} 10
mw_backend_seconds_bucket{backend="clamd",le="+Inf"} 10
mw_backend_seconds_count{backend="clamd"} 10
mw_backend_seconds_sum{backend="clamd"} 0.5
# TYPE mw_sessions gauge
mw_sessions 3
"""


def test_top_shows_rates_ratios_and_latency_between_two_scrapes() -> None:
    first = Scrape("http://node/metrics", 100.0, parse(TEXT))
    later = TEXT.replace('verdict="accept"} 10', 'verdict="accept"} 30').replace(
        'result="hit"} 30', 'result="hit"} 39').replace('result="miss"} 10', 'result="miss"} 11')
    later = later.replace('le="0.1"} 10', 'le="0.1"} 30').replace('le="+Inf"} 10', 'le="+Inf"} 30')
    later = later.replace('_count{backend="clamd"} 10', '_count{backend="clamd"} 30').replace(
        '_sum{backend="clamd"} 0.5', '_sum{backend="clamd"} 1.5')
    second = Scrape("http://node/metrics", 110.0, parse(later))
    screen = render([second], [first])
    assert "(last 10.0 s)" in screen
    assert "       2.0/s           30  verdict=accept" in screen
    assert "hit ratio policy 90%" in screen
    assert "2.0/s mean    50.00  p95    95.50  backend=clamd" in screen
    assert "mw_sessions = 3" in screen
    assert "unreachable" in render([Scrape("http://gone/metrics", 1.0, {}, error="refused")])


def test_quantiles_interpolate_inside_the_bucket() -> None:
    assert quantile([(0.1, 50.0), (1.0, 100.0), (math.inf, 100.0)], 0.5) == 0.1
    assert quantile([(0.1, 50.0), (1.0, 100.0), (math.inf, 100.0)], 0.75) == pytest.approx(0.55)
    assert math.isnan(quantile([(0.1, 0.0), (math.inf, 0.0)], 0.5))


def test_the_daemons_checks_name_a_bad_metrics_listen() -> None:
    from milters.config import MilterConfig, check_milter_config
    from policyd.app import validate
    from policyd.config import PolicydConfig

    assert "milter.metrics_listen: '9101': expected host:port (e.g. 127.0.0.1:9101)" in check_milter_config(
        MilterConfig(metrics_listen="9101"), 0.0)
    assert not [p for p in check_milter_config(MilterConfig(metrics_listen="127.0.0.1:9101"), 0.0)
                if "metrics" in p]
    problems = validate(PolicydConfig(metrics_listen="x:1"))
    assert any(p.startswith("policyd.metrics_listen: ") for p in problems)
