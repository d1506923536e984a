"""``telepipe run --otlp-http``: OTLP/HTTP protobuf and JSON into the running daemon, counted on
/metrics next to gRPC."""

import time

import httpx
import orjson

from .conftest import free_port, total, wait_for
from .test_decode import trace_request


def test_daemon_takes_otlp_http_protobuf_and_json(daemon_factory):
    port = free_port()
    d = daemon_factory("[windows]\nidle_timeout_s = 1.0\n", ["--otlp-http", f"127.0.0.1:{port}"])
    url = f"http://127.0.0.1:{port}"
    now = time.time_ns()
    spans = [{"start": now - 2_000_000, "end": now - 1_000_000, "span_id": bytes([1, 2, 3, 4, 5, 6, 7, i])}
             for i in range(1, 6)]  # fmt: skip
    with httpx.Client(base_url=url, timeout=10) as client:
        r = client.post("/v1/traces", content=trace_request(spans), headers={"Content-Type": "application/x-protobuf"})
        assert r.status_code == 200
        body = {"resourceSpans": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "web"}}]},
            "scopeSpans": [{"spans": [{"traceId": "ab" * 16, "spanId": f"{i:016x}", "name": "GET /", "kind": 2,
                                       "startTimeUnixNano": str(now - 3_000_000), "endTimeUnixNano": str(now)}
                                      for i in range(1, 4)]}]}]}  # fmt: skip
        r = client.post("/v1/traces", content=orjson.dumps(body), headers={"Content-Type": "application/json"})
        assert r.status_code == 200 and r.json() == {}
        assert client.post("/v1/traces", content=b"{", headers={"Content-Type": "application/json"}).status_code == 400

    def counted():
        text = d.metrics_text()
        return total(text, "telepipe_accepted_spans_total") == 8 and text

    text = wait_for(counted, timeout=30)
    assert total(text, "telepipe_requests_total", signal="spans", code="200") == 2
    assert total(text, "telepipe_requests_total", signal="spans", code="400") == 1
    wait_for(lambda: total(d.metrics_text(), "telepipe_processed_spans_total") == 8, timeout=30)
    assert "OTLP/HTTP receiver on port" in d.stop()
