"""The shipped Grafana dashboard asks only for what the daemons export."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from mailwarden.metrics import Metrics
from milters.metrics import MilterMetrics
from policyd.metrics import PolicydMetrics

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "mailwarden.json"
SELECTOR = re.compile(r"\b(mailwarden_\w+)(\{([^}]*)\})?")
MATCHER = re.compile(r"(\w+)\s*(=~|!~|!=|=)\s*\"")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
TARGET_LABELS = {"instance", "job"}
"""Labels Prometheus adds to every scraped sample."""


def exported() -> dict[str, tuple[str, ...]]:
    """Every sample name the daemons export, with its label names."""
    return {**MilterMetrics(Metrics()).metrics.exported(), **PolicydMetrics(Metrics()).metrics.exported()}


def expressions(node: Any) -> list[str]:
    """Every ``expr`` in the dashboard, wherever it sits."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "expr" and isinstance(v, str)] + [
            e for k, v in node.items() if k != "expr" for e in expressions(v)]
    if isinstance(node, list):
        return [e for item in node for e in expressions(item)]
    return []


DASH = json.loads(DASHBOARD.read_text())
EXPRS = expressions(DASH)


def test_the_dashboard_has_queries() -> None:
    assert len(EXPRS) >= 20


@pytest.mark.parametrize("expr", EXPRS)
def test_every_query_names_exported_metrics_and_their_labels(expr: str) -> None:
    known = exported()
    found = SELECTOR.findall(expr)
    assert found, f"no mailwarden metric in {expr!r}"
    labels = set(TARGET_LABELS)
    for name, _, matchers in found:
        assert name in known, f"{name} is not exported by the daemons"
        labels |= set(known[name])
        for label, _ in MATCHER.findall(matchers):
            assert label in TARGET_LABELS or label in known[name], f"{name} has no label {label}"
    for grouping in GROUPING.findall(expr):
        for label in filter(None, (x.strip() for x in grouping.split(","))):
            assert label in labels, f"{expr!r} groups by {label}, which none of its metrics has"


def test_it_imports_as_is_with_a_datasource_chosen_at_import() -> None:
    assert "__inputs" not in DASH and DASH["uid"] and DASH["title"]
    variables = {v["name"]: v for v in DASH["templating"]["list"]}
    source = variables["datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    for panel in DASH["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_the_matcher_finds_a_wrong_name() -> None:
    """The check itself catches a metric nobody exports."""
    assert "mailwarden_milter_mesages_total" not in exported()
    assert SELECTOR.findall('rate(mailwarden_milter_mesages_total{instance=~"$instance"}[5m])')[0][0] == (
        "mailwarden_milter_mesages_total")
