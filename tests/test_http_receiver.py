"""OTLP/HTTP receiver: every answer PROTOCOLS.md asks for, with raw requests against an in-process
receiver and a real spool."""

import gzip
import shutil
import ssl
import subprocess
import threading
import time
import zlib

import httpx
import orjson
import psutil
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from pipeline.config import LimitsConfig, OtlpConfig, OtlpHttpConfig, TierConfig, TlsConfig
from pipeline.selfmetrics import SelfMetrics
from sources.guards import BearerAuth, MemoryGuard, TenantLimiter
from sources.intake import Intake
from sources.otlp_http import OtlpHttpReceiver
from sources.spool import Spool

from .test_decode import log_request, trace_request
from .test_receiver import spooled

PB = {"Content-Type": "application/x-protobuf"}
JS = {"Content-Type": "application/json"}
LIMIT = 1 << 20
TRACE_ID = "5B8EFFF798038103D269B633813FC60C"
SPAN_ID = "EEE19B7EC3C1B174"


class Rx:
    """A running receiver: ``post(path, body, headers)`` and what it spooled."""

    def __init__(self, tmp_path, http: OtlpHttpConfig | None = None, *, budget=1 << 24, tls=None, **guards):
        self.metrics = SelfMetrics()
        self.spool = Spool(tmp_path / "spool", segment_bytes=1 << 16, budget_bytes=budget, fsync="never",
                           metrics=self.metrics)  # fmt: skip
        self.intake = Intake(self.spool, self.metrics, max_future_s=300.0, retry_after_ms=1500, **guards)
        self.rx = OtlpHttpReceiver(http or OtlpHttpConfig(listen="127.0.0.1:0", server_threads=2),
                                   OtlpConfig(max_message_bytes=LIMIT), self.intake, self.metrics, tls=tls)  # fmt: skip
        self.rx.start()
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.rx.port}"
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def post(self, path, body, headers=PB, **kw):
        return self.client.post(path, content=body, headers=headers, **kw)

    def spooled(self):
        return spooled(self.spool)

    def close(self):
        self.client.close()
        self.rx.stop()
        self.spool.close()


@pytest.fixture
def make(tmp_path):
    made = []

    def start(*args, **kw):
        made.append(Rx(tmp_path / str(len(made)), *args, **kw))
        return made[-1]

    yield start
    for r in made:
        r.close()


@pytest.fixture
def rx(make):
    return make()


def status_of(resp, as_json=False) -> status_pb2.Status:
    if as_json:
        assert resp.headers["content-type"].startswith("application/json")
        from google.protobuf import json_format

        return json_format.ParseDict(resp.json(), status_pb2.Status())
    assert resp.headers["content-type"] == "application/x-protobuf"
    return status_pb2.Status.FromString(resp.content)


def json_traces(spans, service="web"):
    return {"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
        "scopeSpans": [{"scope": {"name": "lib"}, "spans": spans}], "unknownField": 1}]}  # fmt: skip


def json_span(**kw):
    span = {"traceId": TRACE_ID, "spanId": SPAN_ID, "name": "GET /", "kind": 2, "startTimeUnixNano": "1000000000",
            "endTimeUnixNano": 1002000000, "status": {"code": 2}, "someFutureField": {"x": 1}}  # fmt: skip
    return {**span, **kw}


def test_protobuf_traces_and_logs_are_spooled_and_counted(rx):
    r = rx.post("/v1/traces", trace_request([{}, {"name": "POST /pay", "span_id": b"\x07" * 8}]))
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-protobuf"
    assert not ExportTraceServiceResponse.FromString(r.content).HasField("partial_success")
    r = rx.post("/v1/logs", log_request([{"body": "hello"}]))
    assert r.status_code == 200
    assert not ExportLogsServiceResponse.FromString(r.content).HasField("partial_success")
    spans, logs = rx.spooled()
    assert [spans.operations[i] for i in spans.op_idx] == ["GET /cart", "POST /pay"]
    assert spans.services == ("checkout",) and spans.span_id.tolist() == [b"\x02" * 8, b"\x07" * 8]
    assert spans.trace_id[0] == b"\x01" * 16
    assert logs.body == ["hello"] and logs.trace_id == ["ab" * 16]
    m = rx.metrics
    assert m.counter("accepted_spans") == 2 and m.counter("received_spans") == 2 and m.counter("accepted_logs") == 1
    assert m.counter("requests", "spans", "200") == 1 and m.counter("requests", "logs", "200") == 1


def test_json_traces_hex_ids_any_case_int64_strings_or_numbers_unknown_fields_ignored(rx):
    body = json_traces([json_span(), json_span(spanId=SPAN_ID.lower(), name="GET /b", kind="3")])
    r = rx.post("/v1/traces", orjson.dumps(body), headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json() == {}  # full success: no partialSuccess
    (batch,) = rx.spooled()
    assert [batch.operations[i] for i in batch.op_idx] == ["GET /", "GET /b"]
    assert batch.trace_id.tolist() == [bytes.fromhex(TRACE_ID)] * 2
    assert batch.span_id.tolist() == [bytes.fromhex(SPAN_ID)] * 2
    assert batch.kind.tolist() == [2, 3] and batch.status.tolist() == [2, 2]
    assert batch.duration_ns.tolist() == [2_000_000, 2_000_000]
    logs = {"resourceLogs": [{"resource": {}, "scopeLogs": [{"logRecords": [
        {"timeUnixNano": 1700000000000000000, "severityNumber": 9, "body": {"stringValue": "hi"}, "traceId": TRACE_ID,
         "attributes": [{"key": "k", "value": {"intValue": "7"}}]}]}]}]}  # fmt: skip
    assert rx.post("/v1/logs", orjson.dumps(logs), headers=JS).json() == {}
    assert rx.spooled()[1].attributes == [{"k": "7"}] and rx.spooled()[1].trace_id == [TRACE_ID.lower()]
    assert rx.metrics.counter("accepted_spans") == 2 and rx.metrics.counter("accepted_logs") == 1


def test_partial_success_in_the_request_encoding(rx):
    body = orjson.dumps(json_traces([json_span(), json_span(traceId="00" * 16), json_span(spanId="abcd")]))
    r = rx.post("/v1/traces", body, headers=JS)
    assert r.status_code == 200
    ps = r.json()["partialSuccess"]
    assert int(ps["rejectedSpans"]) == 2 and "trace_id" in ps["errorMessage"]
    r = rx.post("/v1/traces", trace_request([{}, {"start": 9, "end": 1}]))
    assert ExportTraceServiceResponse.FromString(r.content).partial_success.rejected_spans == 1
    assert rx.metrics.counter("rejected_spans", "invalid") == 3 and rx.metrics.counter("accepted_spans") == 2


def test_gzip_is_counted(rx):
    r = rx.post("/v1/traces", gzip.compress(trace_request([{}] * 10)), headers={**PB, "Content-Encoding": "gzip"})
    assert r.status_code == 200
    body = gzip.compress(orjson.dumps(json_traces([json_span()] * 3)))
    assert rx.post("/v1/traces", body, headers={**JS, "Content-Encoding": "GZIP"}).status_code == 200
    two_members = gzip.compress(trace_request([{}])) + gzip.compress(trace_request([{}]))
    assert rx.post("/v1/traces", two_members, headers={**PB, "Content-Encoding": "gzip"}).status_code == 200
    assert rx.metrics.counter("accepted_spans") == 15  # the two members: one request of 2 spans


@pytest.mark.parametrize("headers, body", [
    (PB, b"\x0a\xff\xff\xff\xff\x0f not protobuf"),
    (JS, b"{not json"),
    (JS, b"[1, 2]"),
    (JS, b'{"resourceSpans": {"not": "a list"}}'),
    (JS, b'{"resourceSpans": [{"scopeSpans": [{"spans": ["not an object"]}]}]}'),
    (JS, orjson.dumps(json_traces([json_span(traceId="zz" * 16)]))),
    (JS, orjson.dumps(json_traces([json_span(name=7)]))),
    ({**PB, "Content-Encoding": "gzip"}, gzip.compress(trace_request([{}]))[:-6]),
    ({**PB, "Content-Encoding": "gzip"}, b"not gzip at all"),
])  # fmt: skip
def test_malformed_is_400_with_a_status_body_and_the_server_keeps_serving(rx, headers, body):
    r = rx.post("/v1/traces", body, headers=headers)
    assert r.status_code == 400
    status = status_of(r, as_json=headers is JS)
    assert status.code == code_pb2.INVALID_ARGUMENT and status.message
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad) and bad.field_violations[0].description == status.message
    assert rx.metrics.counter("requests", "spans", "400") == 1
    assert rx.post("/v1/traces", trace_request([{}])).status_code == 200


def test_unexpected_decoder_error_is_400_not_500(rx, monkeypatch):
    def broken(data):
        raise KeyError("a decoder bug")

    monkeypatch.setitem(rx.rx.decoders, ("spans", False), broken)
    r = rx.post("/v1/traces", trace_request([{}]))
    assert r.status_code == 400 and "KeyError" in status_of(r).message


def test_other_content_types_and_encodings_are_415(rx):
    for ctype in ("text/plain", "application/protobuf", "", "application/jsonx"):
        r = rx.post("/v1/traces", trace_request([{}]), headers={"Content-Type": ctype} if ctype else {})
        assert r.status_code == 415
        assert status_of(r).code == code_pb2.INVALID_ARGUMENT and "content type" in status_of(r).message
    r = rx.post("/v1/traces", b"{}", headers={**JS, "Content-Encoding": "br"})
    assert r.status_code == 415 and "encoding" in status_of(r, as_json=True).message
    assert rx.spooled() == []


def test_over_the_limit_is_413(rx):
    big = trace_request([{"name": "x" * LIMIT}])
    r = rx.post("/v1/traces", big)
    assert r.status_code == 413 and status_of(r).code == code_pb2.RESOURCE_EXHAUSTED
    chunked = rx.post("/v1/traces", iter([big[i : i + 65536] for i in range(0, len(big), 65536)]))
    assert chunked.status_code == 413
    assert rx.post("/v1/traces", gzip.compress(big), headers={**PB, "Content-Encoding": "gzip"}).status_code == 413
    assert rx.post("/v1/traces", trace_request([{}])).status_code == 200
    assert rx.metrics.counter("requests", "spans", "413") == 3


@pytest.fixture(scope="module")
def bomb():
    """~1 GiB of zeros inside a protobuf bytes field, gzipped to ~1 MiB."""
    size = 1 << 30
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    head = b"\x0a" + bytes([0x80, 0x80, 0x80, 0x80, 0x04])  # field 1, length 2**30
    parts = [c.compress(head)]
    zeros = bytes(1 << 22)
    parts += [c.compress(zeros) for _ in range(size // len(zeros))]
    parts.append(c.flush())
    return b"".join(parts)


def test_gzip_bomb_is_413_fast_without_inflating_it(rx, bomb):
    assert len(bomb) < LIMIT * 2
    proc = psutil.Process()
    before = proc.memory_info().rss
    t0 = time.monotonic()
    r = rx.post("/v1/traces", bomb, headers={**PB, "Content-Encoding": "gzip"})
    assert r.status_code == 413
    assert time.monotonic() - t0 < 5.0
    assert proc.memory_info().rss - before < 64 << 20
    assert rx.post("/v1/traces", trace_request([{}])).status_code == 200


def test_unknown_path_404_other_method_405(rx):
    r = rx.post("/v1/spans", trace_request([{}]))
    assert r.status_code == 404 and status_of(r).code == code_pb2.NOT_FOUND
    assert rx.client.get("/").status_code == 404
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        r = rx.client.request(method, "/v1/traces")
        assert r.status_code == 405 and r.headers["allow"] == "POST, OPTIONS"
        assert status_of(r).code == code_pb2.UNIMPLEMENTED
    r = rx.client.get("/v1/logs", headers=JS)
    assert r.status_code == 405 and status_of(r, as_json=True).code == code_pb2.UNIMPLEMENTED


def test_empty_request_is_200(rx):
    assert rx.post("/v1/traces", b"").status_code == 200
    assert rx.post("/v1/logs", b"", headers=JS).json() == {}
    assert rx.post("/v1/traces", b"{}", headers=JS).json() == {}
    assert rx.post("/v1/traces", gzip.compress(b""), headers={**PB, "Content-Encoding": "gzip"}).status_code == 200
    assert rx.spooled() == [] and rx.metrics.counter("requests", "spans", "200") == 3


def retry_info(status) -> int:
    info = error_details_pb2.RetryInfo()
    assert any(d.Unpack(info) for d in status.details if d.Is(info.DESCRIPTOR))
    return info.retry_delay.seconds


def test_tenant_over_its_rate_is_429_with_retry_after(make):
    limits = LimitsConfig(tiers=(TierConfig("std", spans_per_s=1.0, burst=5.0),), default_tier="std")
    rx = make(tenants=TenantLimiter(limits))
    assert rx.post("/v1/traces", trace_request([{}] * 5), headers={**PB, "X-Scope-OrgID": "a"}).status_code == 200
    r = rx.post("/v1/traces", trace_request([{}] * 3), headers={**PB, "X-Scope-OrgID": "a"})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    status = status_of(r)
    assert status.code == code_pb2.RESOURCE_EXHAUSTED and retry_info(status) == int(r.headers["retry-after"])
    assert rx.post("/v1/traces", trace_request([{}] * 3), headers={**PB, "X-Scope-OrgID": "b"}).status_code == 200
    assert rx.metrics.counter("refused_requests", "tenant_rate") == 1
    assert rx.metrics.counter("requests", "spans", "429") == 1


def test_spool_over_budget_and_memory_over_limit_are_503_with_retry_after(make):
    rx = make(budget=1 << 16)
    for _ in range(100):  # until an append would pass the budget
        r = rx.post("/v1/traces", trace_request([{"name": "n" * 2000}] * 10))
        if r.status_code != 200:
            break
    assert r.status_code == 503 and r.headers["retry-after"] == "2"  # 1500 ms, whole seconds up
    assert rx.metrics.counter("refused_requests", "spool_append") == 1
    rx.spool.over_budget = lambda: True  # over the budget: refused before the body is read
    r = rx.post("/v1/traces", orjson.dumps(json_traces([json_span()])), headers=JS)
    assert r.status_code == 503 and r.headers["retry-after"] == "2"
    assert status_of(r, as_json=True).code == code_pb2.UNAVAILABLE and retry_info(status_of(r, as_json=True)) == 2
    assert rx.metrics.counter("refused_requests", "spool_budget") == 1
    assert rx.metrics.counter("requests", "spans", "503") == 2
    rss = [5000]
    rx = make(memory=MemoryGuard(1000, rss=lambda: rss[0], clock=lambda: 0.0))
    r = rx.post("/v1/traces", trace_request([{}]))
    assert r.status_code == 503 and r.headers["retry-after"] == "2" and retry_info(status_of(r)) == 2
    assert rx.metrics.counter("refused_requests", "memory") == 1 and rx.spooled() == []


def test_bearer_token(make):
    rx = make(auth=BearerAuth(["s3cret"]))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = rx.post("/v1/traces", trace_request([{}]), headers={**PB, **headers})
        assert r.status_code == 401 and status_of(r).code == code_pb2.UNAUTHENTICATED
    r = rx.post("/v1/traces", trace_request([{}]), headers={**PB, "Authorization": "Bearer s3cret"})
    assert r.status_code == 200
    assert rx.metrics.counter("refused_requests", "unauthenticated") == 3 and len(rx.spooled()) == 1


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls(make, tmp_path):
    key, crt = tmp_path / "server.key", tmp_path / "server.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", key,
                    "-out", crt, "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)  # fmt: skip
    rx = make(tls=TlsConfig(cert_file=str(crt), key_file=str(key)))
    with httpx.Client(verify=ssl.create_default_context(cafile=str(crt)), timeout=10) as client:
        assert client.post(f"{rx.url}/v1/traces", content=trace_request([{}]), headers=PB).status_code == 200
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port
        httpx.post(rx.url.replace("https", "http") + "/v1/traces", content=trace_request([{}]), headers=PB)
    assert len(rx.spooled()) == 1


def test_cors(make):
    cfg = OtlpHttpConfig(listen="127.0.0.1:0", allowed_origins=("https://*.example.com", "http://localhost:*"),
                         allowed_headers=("X-Scope-OrgID",), cors_max_age_s=600)  # fmt: skip
    rx = make(cfg)
    origin = "https://shop.example.com"
    asked = {"Origin": origin, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "content-type,x-scope-orgid"}  # fmt: skip
    r = rx.client.options("/v1/traces", headers=asked)
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == origin
    assert r.headers["access-control-allow-methods"] == "POST"
    allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
    assert allowed == {"content-type", "x-scope-orgid"}
    assert r.headers["access-control-max-age"] == "600" and r.headers["vary"] == "Origin"
    for refused in ({**asked, "Origin": "https://evil.com"}, {**asked, "Access-Control-Request-Headers": "x-other"},
                    {**asked, "Access-Control-Request-Method": "PUT"}):  # fmt: skip
        r = rx.client.options("/v1/traces", headers=refused)
        assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    r = rx.post("/v1/traces", orjson.dumps(json_traces([json_span()])), headers={**JS, "Origin": origin})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    assert r.headers["access-control-expose-headers"] == "Retry-After"
    r = rx.post("/v1/traces", orjson.dumps(json_traces([json_span()])), headers={**JS, "Origin": "https://evil.com"})
    assert "access-control-allow-origin" not in r.headers
    assert rx.client.options("/v1/traces").headers["allow"] == "POST, OPTIONS"  # no Origin: not a preflight


def test_a_bad_client_does_not_stop_another_being_served(rx, bomb):
    stop = threading.Event()
    bad_answers = []

    def bad_client():
        with httpx.Client(base_url=rx.url, timeout=30) as c:
            bodies = [(b"\xff garbage", PB), (b"{", JS), (bomb, {**PB, "Content-Encoding": "gzip"})]
            while not stop.is_set():
                for body, headers in bodies:
                    bad_answers.append(c.post("/v1/traces", content=body, headers=headers).status_code)

    t = threading.Thread(target=bad_client)
    t.start()
    served = 0
    try:
        deadline = time.monotonic() + 60
        while len(bad_answers) < 9 and time.monotonic() < deadline:
            assert rx.post("/v1/traces", trace_request([{}] * 4)).status_code == 200
            served += 1
    finally:
        stop.set()
        t.join(60)
    assert set(bad_answers) == {400, 413} and served > 3
    assert rx.metrics.counter("accepted_spans") == 4 * served
