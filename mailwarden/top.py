"""``mailwarden top``: a node's picture at once, from its daemons' ``/metrics``.

Each refresh scrapes every URL, and shows per daemon what changed since the previous
scrape: the rate of every counter by its labels (messages and recipients per verdict,
policy decisions per check and action, tempfails by cause, ...), cache hit ratios,
each backend's calls per second and latency (mean and 95th percentile from the
histogram buckets), and the gauges (sessions, quarantine).  It reads the text format
with prometheus-client's parser and names no metric of either daemon.
"""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

Labels = tuple[tuple[str, str], ...]


@dataclass
class Family:
    """One metric family's samples: ``values[(sample name, labels)]``."""

    name: str
    kind: str
    values: dict[tuple[str, Labels], float] = field(default_factory=dict)


@dataclass
class Scrape:
    """One scrape of one URL at a monotonic time."""

    url: str
    at: float
    families: dict[str, Family]
    error: str = ""


def parse(text: str) -> dict[str, Family]:
    """The families of a text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, Family] = {}
    for fam in text_string_to_metric_families(text):
        family = out.setdefault(fam.name, Family(fam.name, fam.type))
        for sample in fam.samples:
            if sample.name.endswith("_created"):
                continue
            family.values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def scrape(url: str, at: float, timeout: float = 5.0) -> Scrape:
    """Fetch and parse one ``/metrics`` (an error is kept, not raised)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (http URLs given by the operator)
            text = response.read().decode("utf-8", "replace")
    except OSError as exc:
        return Scrape(url, at, {}, error=str(exc))
    return Scrape(url, at, parse(text))


def _label_text(labels: Labels, skip: Iterable[str] = ()) -> str:
    skipped = set(skip)
    return ",".join(f"{k}={v}" for k, v in labels if k not in skipped) or "-"


def _short(name: str) -> str:
    return name.removeprefix("mailwarden_")


def quantile(buckets: Sequence[tuple[float, float]], q: float) -> float:
    """The ``q`` quantile from cumulative (upper bound, count) buckets, interpolated
    within the bucket as Prometheus's histogram_quantile does; NaN with no observations."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            span = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / span if span else 1.0)
        lower_bound, lower_count = bound, count
    return lower_bound


def _counter_lines(family: Family, old: Family | None, seconds: float) -> list[str]:
    lines = []
    rows = []
    for (sample, labels), value in sorted(family.values.items()):
        before = old.values.get((sample, labels), 0.0) if old is not None else None
        rate = (value - before) / seconds if before is not None and seconds > 0 else None
        rows.append((labels, value, rate))
    ratio = _hit_ratio(rows)
    lines.append(f"  {_short(family.name)}" + (f"  (hit ratio {ratio})" if ratio else ""))
    for labels, value, rate in sorted(rows, key=lambda r: -(r[2] or 0.0)):
        if value == 0:
            continue
        shown = f"{rate:10.1f}/s" if rate is not None else "         -/s"
        lines.append(f"    {shown} {value:12.0f}  {_label_text(labels)}")
    return lines


def _hit_ratio(rows: list[tuple[Labels, float, float | None]]) -> str:
    """Per ``cache`` label: hits / (hits + misses) over the interval (else in total)."""
    caches: dict[str, dict[str, float]] = {}
    for labels, value, rate in rows:
        d = dict(labels)
        if "cache" in d and d.get("result") in ("hit", "miss"):
            amount = rate if rate is not None else value
            caches.setdefault(d["cache"], {}).setdefault(d["result"], 0.0)
            caches[d["cache"]][d["result"]] += amount
    parts = []
    for cache, counts in sorted(caches.items()):
        total = counts.get("hit", 0.0) + counts.get("miss", 0.0)
        if total > 0:
            parts.append(f"{cache} {100 * counts.get('hit', 0.0) / total:.0f}%")
    return ", ".join(parts)


@dataclass
class _Series:
    """One histogram's label set over the interval."""

    buckets: list[tuple[float, float]] = field(default_factory=list)
    count: float = 0.0
    total: float = 0.0


def _histogram_lines(family: Family, old: Family | None, seconds: float) -> list[str]:
    series: dict[Labels, _Series] = {}
    for (sample, labels), value in family.values.items():
        entry = series.setdefault(tuple((k, v) for k, v in labels if k != "le"), _Series())
        delta = value - (old.values.get((sample, labels), 0.0) if old is not None else 0.0)
        if sample.endswith("_bucket"):
            entry.buckets.append((float(dict(labels)["le"]), delta))
        elif sample.endswith("_count"):
            entry.count = delta
        elif sample.endswith("_sum"):
            entry.total = delta
    since = " since start" if old is None else ""
    lines = [f"  {_short(family.name)}  (calls{'' if since else '/s'}, mean and p95 in ms{since})"]
    for labels, entry in sorted(series.items()):
        if entry.count <= 0:
            continue
        p95 = quantile(sorted(entry.buckets), 0.95)
        per = entry.count / seconds if old is not None and seconds > 0 else None
        rate = f"{per:10.1f}/s" if per is not None else f"{entry.count:10.0f}  "
        lines.append(f"    {rate} mean {1000 * entry.total / entry.count:8.2f}  p95 {1000 * p95:8.2f}  "
                     f"{_label_text(labels)}")
    return lines


def render(scrapes: Sequence[Scrape], previous: Sequence[Scrape] | None = None) -> str:
    """The screen for ``scrapes`` (rates against ``previous``, else totals)."""
    out: list[str] = []
    before = {s.url: s for s in previous or ()}
    for now in scrapes:
        old = before.get(now.url)
        seconds = now.at - old.at if old is not None else 0.0
        out.append(f"{now.url}" + (f"  (last {seconds:.1f} s)" if old is not None else "  (totals)"))
        if now.error:
            out.append(f"  unreachable: {now.error}")
            continue
        gauges: list[str] = []
        for name, family in sorted(now.families.items()):
            old_family = old.families.get(name) if old is not None else None
            if family.kind == "counter":
                out.extend(_counter_lines(family, old_family, seconds))
            elif family.kind == "histogram":
                out.extend(_histogram_lines(family, old_family, seconds))
            elif family.kind == "gauge":
                gauges.extend(f"{_short(name)}{'{' + _label_text(labels) + '}' if labels else ''} = {v:g}"
                              for (_, labels), v in sorted(family.values.items()))
        if gauges:
            out.append("  " + "   ".join(gauges))
        out.append("")
    return "\n".join(out)
