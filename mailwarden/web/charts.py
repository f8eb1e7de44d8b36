"""The dashboard's charts: rates per verdict and backend latency from the daemons' ``/metrics``.

Scrapes go through :mod:`mailwarden.top` (its fetch and parser).  Like ``mailwarden top``,
nothing here names a daemon's metric: a counter with a ``verdict`` or ``action`` label is
a verdict rate (the milter's messages by verdict, the policy daemon's decisions by action),
and a histogram named ``*_backend_seconds`` is backend latency by its ``backend`` label.
Each refresh adds one point per series, from the difference to the previous scrape; the
node is this node's URLs, the cluster every node's URLs added up.  Charts are SVG drawn
here, so the page needs no script library.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

from mailwarden.top import Family, Scrape, scrape

VERDICT_LABELS = ("verdict", "action")
POINTS = 120
PALETTE = ("#1b6ac9", "#d1495b", "#2a9d8f", "#e9a03b", "#6c4ab6", "#5c5c5c", "#8ab17d", "#b5651d")


@dataclass
class Series:
    """Points (time, value) of one line."""

    points: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=POINTS))


def _short(name: str) -> str:
    return name.removeprefix("mailwarden_").removesuffix("_total")


def verdict_values(families: dict[str, Family]) -> dict[str, float]:
    """Counter totals by ``family:label value`` for counters with a verdict-like label."""
    out: dict[str, float] = {}
    for name, family in families.items():
        if family.kind != "counter":
            continue
        for (_, labels), value in family.values.items():
            d = dict(labels)
            label = next((k for k in VERDICT_LABELS if k in d), None)
            if label is not None:
                key = f"{_short(name)}:{d[label]}"
                out[key] = out.get(key, 0.0) + value
    return out


def latency_values(families: dict[str, Family]) -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) per ``daemon backend`` from ``*_backend_seconds`` histograms."""
    out: dict[str, tuple[float, float]] = {}
    for name, family in families.items():
        if family.kind != "histogram" or not name.endswith("_backend_seconds"):
            continue
        daemon = _short(name).removesuffix("_backend_seconds")
        for (sample, labels), value in family.values.items():
            backend = dict(labels).get("backend", "-")
            key = f"{daemon} {backend}"
            total, count = out.get(key, (0.0, 0.0))
            if sample.endswith("_sum"):
                total += value
            elif sample.endswith("_count"):
                count += value
            out[key] = (total, count)
    return out


class Scope:
    """One set of URLs (the node, the cluster) and its series."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)
        self.previous: dict[str, Scrape] = {}
        self.rates: dict[str, Series] = {}
        self.latency: dict[str, Series] = {}
        self.errors: list[str] = []

    def add(self, scrapes: Sequence[Scrape], now: float) -> None:
        """One point per series from these scrapes against the previous ones."""
        rates: dict[str, float] = {}
        sums: dict[str, tuple[float, float]] = {}
        self.errors = [f"{s.url}: {s.error}" for s in scrapes if s.error]
        for current in scrapes:
            old = self.previous.get(current.url)
            if current.error:
                continue
            self.previous[current.url] = current
            if old is None or old.error or current.at <= old.at:
                continue
            seconds = current.at - old.at
            before = verdict_values(old.families)
            for key, value in verdict_values(current.families).items():
                # A restarted daemon starts again from zero: no negative rate.
                rates[key] = rates.get(key, 0.0) + max(value - before.get(key, 0.0), 0.0) / seconds
            before_lat = latency_values(old.families)
            for key, (total, count) in latency_values(current.families).items():
                t0, c0 = before_lat.get(key, (0.0, 0.0))
                s, c = sums.get(key, (0.0, 0.0))
                sums[key] = (s + max(total - t0, 0.0), c + max(count - c0, 0.0))
        for key, rate in rates.items():
            self.rates.setdefault(key, Series()).points.append((now, rate))
        for key, (total, count) in sums.items():
            if count > 0:
                self.latency.setdefault(key, Series()).points.append((now, 1000.0 * total / count))


class Dashboard:
    """The node's and the cluster's series, refreshed at most once per ``interval``."""

    def __init__(self, node_urls: Sequence[str], cluster_urls: Sequence[str], *, interval: float,
                 fetch: Callable[[str, float], Scrape] = scrape,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.scopes = {"node": Scope(node_urls), "cluster": Scope(cluster_urls)}
        self.interval = interval
        self.fetch = fetch
        self.clock = clock
        self._last = -math.inf
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Scrape every URL once unless that was done less than ``interval`` ago (blocking)."""
        with self._lock:
            now = self.clock()
            if now - self._last < self.interval * 0.8:
                return
            self._last = now
            # This node's URLs are usually among the cluster's: each is fetched once.
            urls = dict.fromkeys(u for scope in self.scopes.values() for u in scope.urls)
            got = {u: self.fetch(u, self.clock()) for u in urls}
            for scope in self.scopes.values():
                if scope.urls:
                    scope.add([got[u] for u in scope.urls], now)

    def svg(self, scope: str, kind: str, *, title: str) -> str:
        """A line chart of ``rates`` (per second) or ``latency`` (ms) of a scope."""
        s = self.scopes[scope]
        series = s.rates if kind == "rates" else s.latency
        unit = "/s" if kind == "rates" else "ms"
        return line_chart(title, unit, {k: list(v.points) for k, v in sorted(series.items())},
                          errors=s.errors, configured=bool(s.urls))


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def line_chart(title: str, unit: str, series: dict[str, list[tuple[float, float]]], *,
               errors: Sequence[str] = (), configured: bool = True,
               width: int = 640, height: int = 240) -> str:
    """An SVG line chart; the legend names each series with its last value."""
    left, right, top, bottom = 50, 240, 28, 24
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11" role="img">',
        f"<title>{escape(title)}</title>",
        f'<rect width="{width}" height="{height}" fill="#fff" stroke="#ccc"/>',
        f'<text x="{left}" y="18" font-size="13" font-weight="bold">{escape(title)} ({escape(unit)})</text>',
    ]
    points = [p for pts in series.values() for p in pts]
    if not points:
        why = ("no /metrics URL configured" if not configured
               else "; ".join(errors) if errors else "no data yet: two scrapes with traffic between them")
        parts.append(f'<text x="{left}" y="{top + plot_h / 2}" fill="#777">{escape(why[:110])}</text>')
        parts.append("</svg>")
        return "".join(parts)
    t0 = min(t for t, _ in points)
    t1 = max(t for t, _ in points)
    vmax = max(v for _, v in points) or 1.0
    span = (t1 - t0) or 1.0

    def xy(t: float, v: float) -> str:
        return f"{left + plot_w * (t - t0) / span:.1f},{top + plot_h * (1 - v / vmax):.1f}"

    for frac in (0.0, 0.5, 1.0):
        y = top + plot_h * (1 - frac)
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" fill="#555">'
                     f"{_fmt(vmax * frac)}</text>")
    parts.append(f'<text x="{left}" y="{height - 6}" fill="#555">-{span:.0f} s</text>')
    parts.append(f'<text x="{left + plot_w}" y="{height - 6}" text-anchor="end" fill="#555">now</text>')
    for i, (name, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        if len(pts) == 1:
            parts.append(f'<circle cx="{xy(*pts[0]).split(",")[0]}" cy="{xy(*pts[0]).split(",")[1]}" '
                         f'r="2.5" fill="{colour}"/>')
        else:
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" '
                         f'points="{" ".join(xy(t, v) for t, v in pts)}"/>')
        ly = top + 12 + i * 14
        if ly < height - 4:
            parts.append(f'<rect x="{left + plot_w + 10}" y="{ly - 8}" width="10" height="3" '
                         f'fill="{colour}"/>')
            parts.append(f'<text x="{left + plot_w + 24}" y="{ly - 4}">{escape(name[:30])} '
                         f"{_fmt(pts[-1][1])}</text>")
    parts.append("</svg>")
    return "".join(parts)
