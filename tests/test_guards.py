"""Receiver guards: bearer tokens, TLS, tenant rate limits, memory limit, disk full; fuzzed decode."""

import errno
import logging
import shutil
import subprocess

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import LimitsConfig, OtlpConfig, TenantConfig, TierConfig, TlsConfig
from pipeline.decode import MalformedRequest, decode_logs, decode_traces
from pipeline.selfmetrics import SelfMetrics
from sources.guards import BearerAuth, MemoryGuard, TenantLimiter, TokenBucket
from sources.otlp_grpc import OtlpReceiver
from sources.spool import Spool

from .conftest import free_port
from .test_decode import trace_request
from .test_receiver import TRACES, call, spooled


def start(tmp_path, **kw):
    metrics = SelfMetrics()
    spool = Spool(tmp_path / "spool", fsync="never", metrics=metrics)
    cfg = OtlpConfig(grpc_listen=f"127.0.0.1:{free_port()}")
    rx = OtlpReceiver(cfg, spool, metrics, retry_after_ms=700, **kw)
    rx.start()
    return rx, spool, metrics, cfg.grpc_listen


def retry_ms(err: grpc.RpcError) -> int:
    status = rpc_status.from_call(err)
    info = error_details_pb2.RetryInfo()
    [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)][0].Unpack(info)
    return info.retry_delay.seconds * 1000 + info.retry_delay.nanos // 1_000_000


def test_bearer_token_checked_before_decoding(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    rx, spool, metrics, addr = start(tmp_path, auth=BearerAuth(["s3cret-token", "other"]))
    ch = grpc.insecure_channel(addr)
    try:
        for md in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret-token"),)):
            with pytest.raises(grpc.RpcError) as err:
                call(ch, TRACES, b"\xff not even protobuf", metadata=md)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        call(ch, TRACES, trace_request([{}]), metadata=(("authorization", "Bearer s3cret-token"),))
        assert sum(len(b) for b in spooled(spool)) == 1
        assert metrics.counter("refused_requests", "unauthenticated") == 3
        assert "s3cret" not in caplog.text
    finally:
        ch.close()
        rx.stop(0)
        spool.close()


def test_tenant_rate_limit_answers_resource_exhausted_with_retryinfo(tmp_path):
    limits = LimitsConfig(tiers=(TierConfig("small", spans_per_s=100.0, burst=100.0),),
                          tenants=(TenantConfig("team-a", "small"),))  # fmt: skip
    now = [0.0]
    rx, spool, metrics, addr = start(tmp_path, tenants=TenantLimiter(limits, clock=lambda: now[0]))
    ch = grpc.insecure_channel(addr)
    try:
        a = (("x-scope-orgid", "team-a"),)
        call(ch, TRACES, trace_request([{}] * 80), metadata=a)
        with pytest.raises(grpc.RpcError) as err:
            call(ch, TRACES, trace_request([{}] * 80), metadata=a)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert retry_ms(err.value) == 600  # 60 more tokens at 100/s
        call(ch, TRACES, trace_request([{}] * 80), metadata=(("x-scope-orgid", "team-b"),))  # no tier: unlimited
        now[0] = 0.6
        call(ch, TRACES, trace_request([{}] * 80), metadata=a)
        assert sum(len(b) for b in spooled(spool)) == 240
    finally:
        ch.close()
        rx.stop(0)
        spool.close()


def test_token_bucket_large_requests_pass_alone():
    b = TokenBucket(rate=10.0, burst=10.0, now=0.0)
    assert b.take(50, 0.0) == 0.0  # larger than the burst, bucket full: let through
    assert b.take(1, 0.0) == pytest.approx(0.1)


def test_tenant_buckets_stay_bounded_with_many_distinct_tenants():
    limits = LimitsConfig(tiers=(TierConfig("std", spans_per_s=100.0, burst=100.0),), default_tier="std")
    now = [0.0]
    limiter = TenantLimiter(limits, clock=lambda: now[0])
    most = 0
    for i in range(100_000):  # a client minting a new tenant name every 10 ms for 1000 s
        assert limiter.wait_for(f"tenant-{i}", 10) == 0.0  # a new tenant always gets its burst
        most = max(most, len(limiter.buckets))
        now[0] += 0.01
    # A bucket refills in 0.1 s and is dropped by the next sweep (at most 1 s later).
    assert most <= 150 and len(limiter.buckets) <= 150 and not limiter.overflow


def test_a_dropped_tenant_comes_back_to_a_full_burst():
    limits = LimitsConfig(tiers=(TierConfig("std", spans_per_s=10.0, burst=20.0),), default_tier="std")
    now = [0.0]
    limiter = TenantLimiter(limits, clock=lambda: now[0])
    assert limiter.wait_for("a", 15) == 0.0
    assert limiter.wait_for("a", 10) == pytest.approx(0.5)
    now[0] = 1.0  # 5 + 10 tokens: not full yet, kept
    assert limiter.wait_for("b", 1) == 0.0
    assert "a" in limiter.buckets
    now[0] = 2.5  # full again since t=1.5: dropped by this sweep
    assert limiter.wait_for("b", 1) == 0.0
    assert "a" not in limiter.buckets
    assert limiter.wait_for("a", 20) == 0.0  # the whole burst, as the kept bucket would have answered
    assert limiter.wait_for("a", 1) == pytest.approx(0.1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcd"), st.integers(1, 30), st.sampled_from([0.0, 0.05, 0.4, 1.0, 3.0]))))
def test_dropping_refilled_buckets_changes_no_answer(requests):
    """Every answer equals that of a limiter that keeps each tenant's bucket forever."""
    limits = LimitsConfig(tiers=(TierConfig("std", spans_per_s=10.0, burst=20.0),), default_tier="std")
    now = [0.0]
    limiter = TenantLimiter(limits, clock=lambda: now[0])
    kept: dict[str, TokenBucket] = {}
    for tenant, spans, dt in requests:
        now[0] += dt
        expected = kept.setdefault(tenant, TokenBucket(10.0, 20.0, now[0])).take(spans, now[0])
        assert limiter.wait_for(tenant, spans) == expected


def test_tenants_beyond_max_tenants_share_their_tiers_overflow_bucket():
    limits = LimitsConfig(
        max_tenants=3, default_tier="std", tenants=(TenantConfig("vip", "big"),),
        tiers=(TierConfig("std", spans_per_s=10.0, burst=10.0), TierConfig("big", spans_per_s=100.0, burst=100.0)),
    )  # fmt: skip
    now = [0.0]
    limiter = TenantLimiter(limits, clock=lambda: now[0])
    for tenant in ("a", "b", "c"):
        assert limiter.wait_for(tenant, 5) == 0.0
    assert limiter.wait_for("d", 6) == 0.0  # no room: the std overflow bucket
    assert limiter.wait_for("e", 6) == pytest.approx(0.2)  # the same bucket: 4 tokens left
    assert limiter.wait_for("vip", 100) == 0.0  # its own tier's overflow bucket, untouched by d and e
    assert sorted(limiter.buckets) == ["a", "b", "c"] and sorted(limiter.overflow) == ["big", "std"]
    now[0] = 0.5  # within the sweep interval: nothing dropped yet
    assert limiter.wait_for("a", 1) == 0.0
    now[0] = 1.5  # every bucket has refilled by now: the sweep drops them all and makes room
    assert limiter.wait_for("d", 10) == 0.0  # d's own bucket now, a full one
    assert limiter.buckets.keys() == {"d"} and not limiter.overflow


def test_memory_over_limit_is_unavailable_with_retryinfo(tmp_path):
    rss = [100]
    rx, spool, _, addr = start(tmp_path, memory=MemoryGuard(1000, rss=lambda: rss[0], clock=lambda: 0.0))
    ch = grpc.insecure_channel(addr)
    try:
        call(ch, TRACES, trace_request([{}]))
        rx.intake.memory._next = 0.0
        rss[0] = 5000
        with pytest.raises(grpc.RpcError) as err:
            call(ch, TRACES, trace_request([{}]))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and retry_ms(err.value) == 700
    finally:
        ch.close()
        rx.stop(0)
        spool.close()


def test_disk_full_is_unavailable_and_recovers_without_a_torn_record(tmp_path):
    rx, spool, metrics, addr = start(tmp_path)
    ch = grpc.insecure_channel(addr)
    real_write = spool._write
    try:
        call(ch, TRACES, trace_request([{}] * 3))

        def full(record):
            real_write(record[: len(record) // 2])  # half of it reached the disk, then ENOSPC
            raise OSError(errno.ENOSPC, "No space left on device")

        spool._write = full
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as err:
                call(ch, TRACES, trace_request([{}] * 5))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and retry_ms(err.value) == 700
        spool._write = real_write  # space is back
        call(ch, TRACES, trace_request([{}] * 7))
        assert [len(b) for b in spooled(spool)] == [3, 7]
        assert metrics.counter("refused_requests", "spool_append") == 3
    finally:
        ch.close()
        rx.stop(0)
        spool.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_and_mutual_tls(tmp_path):
    def cert(name, ca=None):
        key, crt = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
        subj = ["-subj", f"/CN={name}"]
        if ca is None:
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                            "-keyout", key, "-out", crt, *subj, "-addext", "subjectAltName=IP:127.0.0.1"],
                           check=True, capture_output=True)  # fmt: skip
        else:
            csr = tmp_path / f"{name}.csr"
            ext = tmp_path / f"{name}.ext"
            ext.write_text("subjectAltName=IP:127.0.0.1\n")
            subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, *subj],
                           check=True, capture_output=True)  # fmt: skip
            subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-CAcreateserial",
                            "-days", "2", "-out", crt, "-extfile", ext], check=True, capture_output=True)  # fmt: skip
        return key, crt

    ca = cert("ca")
    server = cert("server", ca)
    client = cert("client", ca)
    tls = TlsConfig(cert_file=str(server[1]), key_file=str(server[0]), client_ca_file=str(ca[1]))
    rx, spool, _, addr = start(tmp_path, tls=tls)
    try:
        good = grpc.ssl_channel_credentials(ca[1].read_bytes(), client[0].read_bytes(), client[1].read_bytes())
        with grpc.secure_channel(addr, good) as ch:
            call(ch, TRACES, trace_request([{}]))
        no_client_cert = grpc.ssl_channel_credentials(ca[1].read_bytes())
        with grpc.secure_channel(addr, no_client_cert) as ch, pytest.raises(grpc.RpcError):
            call(ch, TRACES, trace_request([{}]))
        with grpc.insecure_channel(addr) as ch, pytest.raises(grpc.RpcError):
            call(ch, TRACES, trace_request([{}]))
        assert sum(len(b) for b in spooled(spool)) == 1
    finally:
        rx.stop(0)
        spool.close()


def test_invalid_utf8_is_invalid_argument():
    body = trace_request([{"name": "ok"}]).replace(b"ok", b"\xff\xfe")
    with pytest.raises(MalformedRequest):
        decode_traces(body)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_decode_never_crashes_on_random_bytes(data):
    for decode in (decode_traces, decode_logs):
        try:
            decode(data)
        except MalformedRequest:
            pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512), st.integers(0, 600))
def test_decode_never_crashes_on_mutated_requests(noise, at):
    body = bytearray(trace_request([{}, {"name": "x", "status": 2}, {"span_id": b"\x00" * 8}]))
    at = min(at, len(body))
    mutated = bytes(body[:at]) + noise + bytes(body[at:])
    try:
        decode_traces(mutated)
    except MalformedRequest:
        pass


def test_max_connection_age_closes_connections_and_clients_carry_on(tmp_path):
    metrics = SelfMetrics()
    spool = Spool(tmp_path / "spool", fsync="never", metrics=metrics)
    cfg = OtlpConfig(grpc_listen=f"127.0.0.1:{free_port()}", max_connection_age_s=0.3, max_connection_age_grace_s=0.2)
    rx = OtlpReceiver(cfg, spool, metrics)
    rx.start()
    states = []
    ch = grpc.insecure_channel(cfg.grpc_listen)
    ch.subscribe(lambda s: states.append(s), try_to_connect=True)
    try:
        import time

        for _ in range(8):
            call(ch, TRACES, trace_request([{}]))
            time.sleep(0.15)
        assert sum(len(b) for b in spooled(spool)) == 8
        assert states.count(grpc.ChannelConnectivity.READY) >= 2  # the server closed it, the client reconnected
    finally:
        ch.close()
        rx.stop(0)
        spool.close()
