"""The text exposition format (0.0.4) of telepipe's series and self-metrics, written directly.

Written from a copy of the series state rather than through prometheus_client's sample
objects: at 10,000 keys (70 lines each, 110 MiB of text) those took 10 s and added ~90 MiB
of RSS per scrape, this takes ~1 s and ~15 MiB (``bench/scrape.py``). The page is built in
chunks of a few thousand lines, each dropped once written.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from itertools import accumulate
from operator import attrgetter

from prometheus_client.utils import floatToGoString

from pipeline.dimensions import SEP
from pipeline.dimensions import labels as dimension_labels
from pipeline.model import OVERFLOW_OPERATION, SPAN_KINDS, STATE_VALUE
from pipeline.selfmetrics import COUNTERS, GAUGES, SelfMetrics

QUANTILE_LABELS = ("0.5", "0.9", "0.95", "0.99", "1")


def kind_label(k: int) -> str:
    return SPAN_KINDS[k] if 0 <= k < len(SPAN_KINDS) else str(k)


def render_page(
    bounds, series: list, latest: list, anomaly: list, scaling: list, metrics: SelfMetrics, db: dict | None = None,
    exemplars: dict | None = None, openmetrics: bool = False,
) -> Iterator[bytes]:
    """The page of a copy of the series state (see ``SeriesState.render``), in chunks. In
    OpenMetrics (``openmetrics``), counter families are named without ``_total``, the duration
    histogram's buckets carry ``exemplars`` ({series key: {bucket: (trace id, seconds, unix
    time)}}: the slowest spans of recent windows) and the page ends with ``# EOF``."""
    page = _Page(openmetrics)
    labels = _LabelCache(("service_name", "span_name", "span_kind", "status_code"))
    les = [f',le="{_fmt(b)}"}} ' for b in bounds] + [',le="+Inf"} ']
    exemplars = exemplars or {}

    yield from page.family("telepipe_calls_total", "counter", "Spans per operation and status (closed windows)")
    for key, n, _, _ in series:
        yield from page.line(f"telepipe_calls_total{{{labels(key)}}} {n}\n")
    yield from page.family("telepipe_duration_seconds", "histogram",
                           "Span duration per operation and status (closed windows)")  # fmt: skip
    yield from _histogram(page, "telepipe_duration_seconds", labels, les, series, exemplars)

    yield from page.family("telepipe_window_latency_seconds", "gauge",
                           "Latency quantiles of the last closed window (quantile 1 is the max)")  # fmt: skip
    for key, (q, _, _) in latest:
        lb = labels(key)
        yield from page.lines(
            f'telepipe_window_latency_seconds{{{lb},quantile="{ql}"}} {_fmt(v)}\n'
            for ql, v in zip(QUANTILE_LABELS, q, strict=True)
        )
    yield from page.family("telepipe_window_calls", "gauge", "Spans in the last closed window")
    for key, (_, count, _) in latest:
        yield from page.line(f"telepipe_window_calls{{{labels(key)}}} {count}\n")

    yield from _render_anomaly(page, labels, anomaly)
    yield from _render_scaling(page, labels, scaling)
    yield from _render_db(page, les, db or {})
    yield from _render_graph(page, les, (db or {}).get("graph", ()))
    yield from _render_selfmetrics(page, metrics)
    if openmetrics:
        yield from page.line("# EOF\n")
    yield from page.flush()


def _histogram(page: _Page, name: str, labels: _LabelCache, les: list[str], rows, exemplars: dict) -> Iterator[bytes]:
    """A histogram's samples: ``rows`` of (key, count, bucket counts, sum); buckets cumulated,
    with the exemplar of a bucket when ``exemplars`` has one for the key."""
    for key, n, buckets, total in rows:
        lb = labels(key)
        marks = exemplars.get(key)
        if marks:
            yield from page.lines(
                f"{name}_bucket{{{lb}{le}{acc}{_exemplar(marks.get(i))}\n"
                for i, (le, acc) in enumerate(zip(les, accumulate(buckets)))
            )
        else:
            yield from page.lines(f"{name}_bucket{{{lb}{le}{acc}\n" for le, acc in zip(les, accumulate(buckets)))
        yield from page.line(f"{name}_count{{{lb}}} {n}\n{name}_sum{{{lb}}} {_fmt(total)}\n")


def _exemplar(mark: tuple[str, float, float] | None) -> str:
    """An OpenMetrics exemplar: `` # {trace_id="..."} value timestamp`` ('' for none)."""
    if mark is None:
        return ""
    trace_id, seconds, when = mark
    return f' # {{trace_id="{_escape(trace_id)}"}} {_fmt(seconds)} {when:.3f}'


def _render_anomaly(page: _Page, labels: _LabelCache, items: list) -> Iterator[bytes]:
    yield from _gauges(page, labels, items, (
        ("telepipe_anomaly_score", "Anomaly score of the last window: max |z| / k over judged features "
         "(>= 1 is anomalous)", attrgetter("score")),
        ("telepipe_anomaly_hst_score", "HalfSpaceTrees score of the last window", attrgetter("hst_score")),
        ("telepipe_anomaly_learning", "1 while the key is still learning its baseline",
         lambda u: 1.0 if u.learning else 0.0),
        ("telepipe_alert_state", "Alert state: 0 ok, 1 pending, 2 firing", lambda u: float(STATE_VALUE[u.state])),
    ))  # fmt: skip
    bands = (
        ("telepipe_anomaly_observed", "Feature value of the last window", "observed"),
        ("telepipe_anomaly_expected", "Expected feature value", "expected"),
        ("telepipe_anomaly_lower", "Lower edge of the normal band", "lower"),
        ("telepipe_anomaly_upper", "Upper edge of the normal band", "upper"),
    )
    for name, doc, field in bands:
        yield from page.family(name, "gauge", doc)
        for key, (u, _) in items:
            lb = labels(key)
            for j in u.judgements:
                # a feature without a baseline yet has an observed value only
                if field == "observed" or not math.isnan(j.expected):
                    yield from page.line(
                        f'{name}{{{lb},feature="{_escape(j.feature)}"}} {_fmt(getattr(j, field))}\n'
                    )


def _render_db(page: _Page, les: list[str], db: dict) -> Iterator[bytes]:
    """Database calls per statement (pipeline/db_analysis.py), the findings' counters, and the
    exceptions of span events (pipeline/exceptions.py)."""
    labels = _LabelCache(("service_name", "db_system", "db_statement"))
    calls = db.get("calls", ())
    yield from page.family("telepipe_db_calls_total", "counter",
                           "Database calls per service, database system and normalized statement")  # fmt: skip
    for key, n, _, _ in calls:
        yield from page.line(f"telepipe_db_calls_total{{{labels(key)}}} {n}\n")
    yield from page.family("telepipe_db_duration_seconds", "histogram",
                           "Database call duration per service, database system and normalized statement")  # fmt: skip
    yield from _histogram(page, "telepipe_db_duration_seconds", labels, les, calls, {})
    yield from page.family("telepipe_slow_queries_total", "counter",
                           "Database calls of db.slow_query_s or longer (findings)")  # fmt: skip
    for key, n in db.get("slow", ()):
        yield from page.line(f"telepipe_slow_queries_total{{{labels(key)}}} {n}\n")
    exceptions = _LabelCache(("service_name", "span_name", "exception_type"))
    yield from page.family("telepipe_exceptions_total", "counter",
                           "Spans that recorded an exception event, by the type of their last one")  # fmt: skip
    for key, n in db.get("exceptions", ()):
        yield from page.line(f"telepipe_exceptions_total{{{exceptions(key)}}} {n}\n")
    n1 = _LabelCache(("service_name", "span_name", "db_statement"))
    yield from page.family("telepipe_n_plus_one_total", "counter",
                           "N+1 patterns: runs of the same statement under one parent span (findings)")  # fmt: skip
    for key, n in db.get("n_plus_one", ()):
        yield from page.line(f"telepipe_n_plus_one_total{{{n1(key)}}} {n}\n")


def _render_graph(page: _Page, les: list[str], rows) -> Iterator[bytes]:
    """Requests between services and virtual nodes (pipeline/graph_calls.py): the families of
    Tempo's and the Collector's service graphs (``traces_service_graph_*``) under telepipe's
    prefix. ``rows``: (key, calls, failed, bucket counts, sum)."""
    labels = _LabelCache(("client", "server", "connection_type"))
    name = "telepipe_service_graph_request"
    yield from page.family(f"{name}_total", "counter", "Requests between two nodes of the service graph")
    for key, n, _, _, _ in rows:
        yield from page.line(f"{name}_total{{{labels(key)}}} {n}\n")
    yield from page.family(f"{name}_failed_total", "counter", "Failed requests between two nodes of the service graph")
    for key, _, failed, _, _ in rows:
        yield from page.line(f"{name}_failed_total{{{labels(key)}}} {failed}\n")
    yield from page.family(f"{name}_server_seconds", "histogram",
                           "Request duration as the server saw it (the client, for virtual nodes)")  # fmt: skip
    yield from _histogram(page, f"{name}_server_seconds", labels, les,
                          [(key, n, buckets, total) for key, n, _, buckets, total in rows], {})  # fmt: skip


def _render_scaling(page: _Page, labels: _LabelCache, items: list) -> Iterator[bytes]:
    by_service = [((service,), v) for service, v in items]
    yield from _gauges(page, labels, by_service, (
        ("telepipe_desired_replicas", "Desired replicas (HPA algorithm)", attrgetter("desired")),
        ("telepipe_observed_replicas", "Distinct service.instance.id in the last window", attrgetter("observed")),
        ("telepipe_scaling_call_rate", "SERVER calls per second in the last window", attrgetter("call_rate")),
        ("telepipe_scaling_forecast_call_rate", "Forecast SERVER calls per second", attrgetter("forecast_rate")),
    ))  # fmt: skip
    yield from page.family("telepipe_scaling_reason", "gauge", "1 for the rule that decided the desired replicas")
    for key, (u, _) in by_service:
        yield from page.line(f'telepipe_scaling_reason{{{labels(key)},reason="{_escape(u.reason_code)}"}} 1\n')


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
_CHUNK_LINES = 4096


def _fmt(v: float) -> str:
    """A float sample value as Go (and so Prometheus and prometheus_client) writes it:
    ``+Inf``, ``NaN``, ``1e+06``. Integer counts are written as integers, also valid."""
    return floatToGoString(v)


def _escape(v: str) -> str:
    """A label value in the text format: backslash, double quote and line feed escaped."""
    if "\\" in v or '"' in v or "\n" in v:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return v


class _LabelCache:
    """``name="value",...`` for a key tuple, escaped once per scrape (names taken in order). A
    span_name that is the overflow series also gets ``otel_metric_overflow="true"``, as the
    Collector labels its overflow series; one with dimensions (``pipeline/dimensions.py``) is
    its span name, and a label per dimension after the key's labels."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.cache: dict[tuple, str] = {}
        self.span_name = names.index("span_name") if "span_name" in names else -1

    def __call__(self, key: tuple) -> str:
        text = self.cache.get(key)
        if text is None:
            extra = ""
            i = self.span_name
            if i >= 0 and len(key) > i and SEP in key[i]:
                name, dims = dimension_labels(key[i])
                key, extra = (*key[:i], name, *key[i + 1 :]), "".join(f',{k}="{_escape(v)}"' for k, v in dims)
            text = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(self.names, key)) + extra
            if i >= 0 and len(key) > i and key[i] == OVERFLOW_OPERATION:
                text += ',otel_metric_overflow="true"'
            self.cache[key] = text
        return text


class _Page:
    """Collects exposition lines and hands them out as encoded chunks."""

    def __init__(self, openmetrics: bool = False) -> None:
        self.buf: list[str] = []
        self.openmetrics = openmetrics

    def family(self, name: str, kind: str, doc: str) -> Iterator[bytes]:
        if self.openmetrics and kind == "counter" and name.endswith("_total"):
            name = name[: -len("_total")]  # OpenMetrics names the family, its sample is name_total
        doc = doc.replace("\\", "\\\\").replace("\n", "\\n")
        return self.line(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")

    def line(self, text: str) -> Iterator[bytes]:
        self.buf.append(text)
        if len(self.buf) >= _CHUNK_LINES:
            yield from self.flush()

    def lines(self, texts: Iterable[str]) -> Iterator[bytes]:
        self.buf.extend(texts)
        if len(self.buf) >= _CHUNK_LINES:
            yield from self.flush()

    def flush(self) -> Iterator[bytes]:
        if self.buf:
            chunk = "".join(self.buf).encode()
            self.buf = []
            yield chunk


def _gauges(page: _Page, labels: _LabelCache, items: list, specs: tuple) -> Iterator[bytes]:
    """One gauge family per (name, help, value of an update) over ``items`` ((key, (update,
    time)) pairs); a NaN value has no sample."""
    for name, doc, value in specs:
        yield from page.family(name, "gauge", doc)
        for key, (u, _) in items:
            v = value(u)
            if not math.isnan(v):
                yield from page.line(f"{name}{{{labels(key)}}} {_fmt(v)}\n")


def _render_selfmetrics(page: _Page, metrics: SelfMetrics) -> Iterator[bytes]:
    counters, gauges = metrics.snapshot()
    for table, values, kind, suffix in ((COUNTERS, counters, "counter", "_total"), (GAUGES, gauges, "gauge", "")):
        for name, (doc, label_names) in table.items():
            full = f"telepipe_{name}{suffix}"
            yield from page.family(full, kind, doc)
            samples = values.get(name) or ({(): 0} if not label_names else {})
            labels = _LabelCache(label_names)
            for lv, v in sorted(samples.items()):
                yield from page.line(f"{full}{{{labels(lv)}}} {_fmt(v)}\n" if lv else f"{full} {_fmt(v)}\n")
