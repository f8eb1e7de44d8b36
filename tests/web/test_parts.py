"""The console's parts without a browser: `mailwarden web check`, the charts from /metrics
text, the quarantine's visibility rule."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from mailwarden.cli import main
from mailwarden.top import Scrape, parse
from mailwarden.web.charts import Dashboard
from mailwarden.web.quarantine import Held, visible

METRICS = """\
# TYPE mailwarden_milter_messages_total counter
mailwarden_milter_messages_total{{verdict="accept"}} {accept}
mailwarden_milter_messages_total{{verdict="reject"}} {reject}
# TYPE mailwarden_milter_backend_seconds histogram
mailwarden_milter_backend_seconds_bucket{{backend="spamd",le="0.1"}} {calls}
mailwarden_milter_backend_seconds_bucket{{backend="spamd",le="+Inf"}} {calls}
mailwarden_milter_backend_seconds_sum{{backend="spamd"}} {seconds}
mailwarden_milter_backend_seconds_count{{backend="spamd"}} {calls}
"""


def check(tmp_path: Path, web: str, key: bytes | None = b"x" * 40, mode: int = 0o600) -> tuple[int, str]:
    keyfile = tmp_path / "web.key"
    if key is not None:
        keyfile.write_bytes(key)
        keyfile.chmod(mode)
    cfg = tmp_path / "mailwarden.toml"
    cfg.write_text(f'[web]\nsecret_key_file = "{keyfile}"\n{web}')
    result = CliRunner().invoke(main, ["--config", str(cfg), "web", "check"])
    return result.exit_code, result.output


def test_web_check_accepts_a_good_section_and_names_each_problem(tmp_path: Path) -> None:
    code, out = check(tmp_path, 'listen = "127.0.0.1:8025"\n')
    assert code == 0 and "[web] OK" in out
    code, out = check(tmp_path, 'listen = "console.example:80"\nsession_lifetime = 0\n'
                                'metrics_urls = ["ftp://x/metrics"]\n')
    assert code == 78
    assert "web.listen" in out and "web.session_lifetime: must be positive" in out
    assert "web.metrics_urls[0]" in out
    assert check(tmp_path, "", key=b"short")[0] == 78
    code, out = check(tmp_path, "", mode=0o644)
    assert code == 78 and "readable by others" in out
    code, out = check(tmp_path, "", key=None)
    assert code == 78 and "web.secret_key_file" in out


def test_the_dashboard_adds_nodes_up_and_rates_the_difference() -> None:
    totals = {"a": [(10, 1, 4, 0.4), (30, 3, 8, 1.2)], "b": [(0, 0, 0, 0.0), (10, 0, 2, 0.2)]}
    step = {"a": 0, "b": 0}

    def fetch(url: str, at: float) -> Scrape:
        accept, reject, calls, seconds = totals[url][step[url]]
        step[url] += 1
        text = METRICS.format(accept=accept, reject=reject, calls=calls, seconds=seconds)
        return Scrape(url, at, parse(text))

    now = [0.0]
    board = Dashboard(["a"], ["a", "b"], interval=1.0, fetch=fetch, clock=lambda: now[0])
    board.refresh()
    assert "no data yet" in board.svg("cluster", "rates", title="cluster")
    now[0] = 10.0
    board.refresh()
    node = board.scopes["node"]
    assert node.rates["milter_messages:accept"].points[-1] == (10.0, 2.0)
    assert node.rates["milter_messages:reject"].points[-1] == (10.0, 0.2)
    assert round(node.latency["milter spamd"].points[-1][1], 3) == 200.0  # 0.8 s over 4 calls
    cluster = board.scopes["cluster"]
    assert cluster.rates["milter_messages:accept"].points[-1] == (10.0, 3.0)
    svg = board.svg("cluster", "rates", title="cluster")
    assert svg.startswith("<svg") and "milter_messages:accept 3" in svg


def test_a_message_is_visible_to_each_recipient_with_their_own_addresses_only() -> None:
    one = Held("1", 0.0, "s@x", ("kept@example.com",), "keyword", "a", 1)
    two = Held("2", 0.0, "s@x", ("kept@example.com", "bob@example.com"), "keyword", "b", 1)
    other = Held("3", 0.0, "s@x", ("taro@example.jp",), "virus", "c", 1)
    kept_two = Held("2", 0.0, "s@x", ("kept@example.com",), "keyword", "b", 1)
    assert visible([one, two, other], lambda r: r == "kept@example.com") == [one, kept_two]
    assert visible([one, two, other], lambda r: r.endswith("@example.com")) == [one, two]
