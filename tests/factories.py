"""Small builders of domain objects for unit tests."""

import numpy as np

from pipeline.config import DEFAULT_BUCKETS
from pipeline.model import ServiceWindow, WindowResult

S = 1_000_000_000
WINDOW = 10 * S
NB = len(DEFAULT_BUCKETS) + 1


def result(op="GET /a", kind=2, start=0, count=100, errors=0, p95=0.1, p99=None, service="svc"):
    p99 = p99 if p99 is not None else p95 * 1.5
    buckets = ((0,) * NB, (0,) * NB, (0,) * NB)
    return WindowResult(
        service=service, operation=op, span_kind=kind, window_start=start, window_end=start + WINDOW,
        count=count, errors=errors, p50=p95 / 2, p90=p95 * 0.9, p95=p95, p99=p99, max=p99 * 2, sum=count * p95 / 2,
        status_counts=(count - errors, 0, errors), bucket_counts=buckets, status_sums=(0.0, 0.0, 0.0),
        slow_traces=tuple(f"{i:032x}" for i in range(1, 8)), error_traces=tuple(f"{i:032x}" for i in range(100, 103)),
    )  # fmt: skip


def service_window(i, results=None, instances=("pod-1",), logs=0, error_logs=0, service="svc", server_p95=None):
    start = i * WINDOW
    results = tuple(
        WindowResult(**{**r.__dict__, "window_start": start, "window_end": start + WINDOW})
        for r in (results or [result()])
    )
    server = [r for r in results if r.span_kind == 2]
    return ServiceWindow(
        service=service, window_start=start, window_end=start + WINDOW, results=results, instances=instances,
        logs=logs, error_logs=error_logs, server_calls=sum(r.count for r in server),
        server_errors=sum(r.errors for r in server),
        server_p95=server_p95 if server_p95 is not None else (max(r.p95 for r in server) if server else float("nan")),
    )  # fmt: skip


def attribute_table(spans: list[dict], keys: tuple[str, ...]) -> tuple[tuple[str, ...], np.ndarray]:
    """``SpanBatch.attr_values`` and ``attrs`` for spans given as dicts with an "attrs" dict."""
    values: dict[str, int] = {}
    attrs = np.full((len(keys), len(spans)), -1, dtype=np.int32)
    for i, s in enumerate(spans):
        for j, k in enumerate(keys):
            if k in s.get("attrs", {}):
                attrs[j, i] = values.setdefault(s["attrs"][k], len(values))
    return tuple(values), attrs
