"""OTLP/HTTP receiver: POST /v1/traces, /v1/logs, /v1/metrics (protobuf and JSON), on aiohttp.

Behind the same ``Intake`` as the gRPC receiver (guards, decode, clock check, tenant limit,
spool append: 200 only after the append). Answers (``../shared/PROTOCOLS.md``, "OTLP over HTTP"):

- 200 with the ``Export*ServiceResponse`` in the request's encoding (``partial_success`` only
  when items were rejected or cut down); an empty body is an empty request: 200;
- 400 malformed data (``google.rpc.Status`` INVALID_ARGUMENT with ``BadRequest``; never retried),
  any unexpected decoder error included; 401 missing or wrong bearer token; 404 other paths;
  405 other methods (``Allow: POST, OPTIONS``); 413 over ``otlp.max_message_bytes`` after
  decompression (a gzip body is inflated chunk by chunk and refused as soon as it passes the
  limit: a bomb is never inflated); 415 a content type other than ``application/x-protobuf``
  and ``application/json``, or a content encoding other than gzip/identity;
- 429 a tenant over its rate, 503 spool over budget, append failure or memory over its limit,
  both with ``Retry-After`` (whole seconds, at least 1) and ``RetryInfo``;
- every 4xx/5xx body is a ``google.rpc.Status`` in the request's encoding (protobuf when the
  content type is neither);
- CORS: a preflight (OPTIONS with ``Origin``) from an origin matching ``allowed_origins``
  (fnmatch) gets 204 and the ``Access-Control-Allow-*`` headers, any other 403; responses to
  allowed origins carry ``Access-Control-Allow-Origin`` and expose ``Retry-After``.

The server runs its own event loop in its own thread (the daemon's main thread runs the
dataflow); decoding and the spool append run in a thread pool of ``otlp_http.server_threads``.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import math
import socket
import ssl
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import orjson
from aiohttp import web
from google.protobuf import any_pb2, duration_pb2, json_format
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from pipeline.config import OtlpConfig, OtlpHttpConfig, TlsConfig
from pipeline.decode import (
    Decoded,
    DecodeLimits,
    MalformedRequest,
    decode_logs,
    decode_logs_json,
    decode_metrics,
    decode_metrics_json,
    decode_traces,
    decode_traces_json,
)
from pipeline.decode.spans import json_request
from pipeline.selfmetrics import SelfMetrics
from sources import intake
from sources.intake import Intake, Outcome

log = logging.getLogger("telepipe.otlp")

PATHS = {"/v1/traces": "spans", "/v1/logs": "logs", "/v1/metrics": "metrics"}
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
ALLOW = "POST, OPTIONS"
# Request headers a browser may send without asking (CORS-safelisted) besides Content-Type.
SAFELISTED = frozenset({"accept", "accept-language", "content-language", "content-type"})
CHUNK = 1 << 16
EMPTY = Decoded(None, 0, 0, "")


class BodyTooLarge(Exception):
    pass


class UnsupportedEncoding(Exception):
    pass


class Gunzip:
    """gzip inflated chunk by chunk, never past ``limit`` bytes of output (plus one, to know it
    went past): ``BodyTooLarge`` as soon as it does. Several gzip members in a row are read
    one after the other (as ``gzip -d`` does); a truncated or corrupt stream is malformed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.out: list[bytes] = []
        self.inflater = zlib.decompressobj(wbits=31)
        self.fed = False  # the current member has had input

    def feed(self, data: bytes) -> None:
        try:
            while data:
                d = self.inflater
                self.fed = True
                out = d.decompress(data, self.limit - self.size + 1)
                self.size += len(out)
                if self.size > self.limit:
                    raise BodyTooLarge
                self.out.append(out)
                if d.eof:  # the member ended: what follows is the next one
                    data = d.unused_data
                    self.inflater = zlib.decompressobj(wbits=31)
                    self.fed = False
                elif not out and d.unconsumed_tail == data:
                    raise MalformedRequest("gzip stream makes no progress")
                else:
                    data = d.unconsumed_tail
        except zlib.error as exc:
            raise MalformedRequest(f"malformed gzip body: {exc}") from exc

    def finish(self) -> bytes:
        if self.fed and not self.inflater.eof:
            raise MalformedRequest("truncated gzip body")
        return self.out[0] if len(self.out) == 1 else b"".join(self.out)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, decompressed, at most ``limit`` bytes (else ``BodyTooLarge``, as soon as
    the limit is passed, compressed or not). gzip, identity (or ``none``, or no header) only."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    gunzip: Gunzip | None = None
    if encoding == "gzip":
        gunzip = Gunzip(limit)
    elif encoding not in ("", "identity", "none"):
        raise UnsupportedEncoding(encoding)
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    content = request.content
    while True:
        chunk = await content.readany()
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        if gunzip is not None:
            gunzip.feed(chunk)
        else:
            chunks.append(chunk)
    if gunzip is not None:
        return gunzip.finish()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def json_decoder(decode: Callable[[dict], Decoded]) -> Callable[[bytes], Decoded]:
    """OTLP/JSON bytes -> ``decode(object)``; an empty body is an empty request."""

    def decode_json(data: bytes) -> Decoded:
        return decode(json_request(data)) if data.strip() else EMPTY

    return decode_json


def decoders(limits: DecodeLimits) -> dict[tuple[str, bool], Callable[[bytes], Decoded]]:
    """(signal, JSON?) -> bytes -> Decoded."""
    out: dict[tuple[str, bool], Callable[[bytes], Decoded]] = {
        ("spans", False): lambda data: decode_traces(data, limits),
        ("spans", True): json_decoder(lambda obj: decode_traces_json(obj, limits)),
        ("logs", False): lambda data: decode_logs(data, limits),
        ("logs", True): json_decoder(lambda obj: decode_logs_json(obj, limits)),
        ("metrics", False): decode_metrics,
        ("metrics", True): json_decoder(decode_metrics_json),
    }
    return out


def ssl_context(tls: TlsConfig | None) -> ssl.SSLContext | None:
    """``[tls]`` as an ``SSLContext``: a server certificate, and client certificates required
    when ``client_ca_file`` is set (mutual TLS)."""
    if tls is None or not tls.cert_file:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file:
        ctx.load_verify_locations(cafile=tls.client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def listen_socket(listen: str, reuse_port: bool) -> socket.socket:
    """A bound, listening TCP socket for ``HOST:PORT`` (port 0: any free one). SO_REUSEPORT
    only when asked (``--processes N``), as for gRPC: otherwise a second daemon on the same port
    fails to start instead of silently sharing it."""
    host, _, port = listen.rpartition(":")
    family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]  # fmt: skip
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind the OTLP/HTTP address {listen}: {exc}") from exc
    return sock


def _any(message: Message) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


def status_body(code: int, message: str, as_json: bool, retry_after_s: int = 0) -> bytes:
    """A ``google.rpc.Status``: ``BadRequest`` details for INVALID_ARGUMENT, ``RetryInfo`` when
    the client should retry after ``retry_after_s``."""
    status = status_pb2.Status(code=code, message=message)
    if code == code_pb2.INVALID_ARGUMENT:
        violation = error_details_pb2.BadRequest.FieldViolation(field="", description=message)
        status.details.append(_any(error_details_pb2.BadRequest(field_violations=[violation])))
    if retry_after_s:
        delay = duration_pb2.Duration(seconds=retry_after_s)
        status.details.append(_any(error_details_pb2.RetryInfo(retry_delay=delay)))
    return encode(status, as_json)


def encode(message: Message, as_json: bool) -> bytes:
    if as_json:
        return orjson.dumps(json_format.MessageToDict(message))  # lowerCamelCase keys; empty: {}
    return message.SerializeToString()


class OtlpHttpReceiver:
    """The aiohttp server, in a thread of its own. Binds in the constructor (like the gRPC
    receiver: a taken port fails the daemon's start); ``port`` is the bound one."""

    def __init__(
        self,
        cfg: OtlpHttpConfig,
        otlp: OtlpConfig,
        intake: Intake,
        metrics: SelfMetrics,
        *,
        tls: TlsConfig | None = None,
        reuse_port: bool = False,
        limits: DecodeLimits | None = None,
    ) -> None:
        self.cfg = cfg
        self.intake = intake
        self.metrics = metrics
        self.limit = otlp.max_message_bytes
        self.grace = otlp.shutdown_grace_s
        self.decoders = decoders(limits or DecodeLimits(otlp.max_log_attributes, otlp.max_attribute_value_bytes))
        self.tenant_key = intake.tenants.key if intake.tenants is not None else ""
        self.origins = tuple(o.lower() for o in cfg.allowed_origins)
        self.allowed_headers = {h.lower() for h in cfg.allowed_headers} | SAFELISTED
        self.allow_headers = ", ".join(["Content-Type", *cfg.allowed_headers])
        self.ssl = ssl_context(tls)
        self.sock = listen_socket(cfg.listen, reuse_port)
        self.port = self.sock.getsockname()[1]
        self.pool = ThreadPoolExecutor(cfg.server_threads, thread_name_prefix="otlp-http")
        self.in_flight = 0  # requests past admission, on the event loop's thread only
        self.loop = asyncio.new_event_loop()
        self.runner: web.AppRunner | None = None
        self.thread = threading.Thread(target=self._serve, name="otlp-http", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # -- lifecycle
    def start(self) -> None:
        self.thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        log.info("OTLP/HTTP receiver on port %d%s", self.port, " (TLS)" if self.ssl else "")

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as exc:  # noqa: BLE001 (handed to start())
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        app = web.Application(client_max_size=self.limit)
        for path in PATHS:
            app.router.add_route("*", path, self.handle)
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.grace, auto_decompress=False)
        await self.runner.setup()
        await web.SockSite(self.runner, self.sock, ssl_context=self.ssl, backlog=1024).start()

    def stop(self) -> None:
        """Stop accepting; requests in flight get ``otlp.shutdown_grace_s`` to finish (their
        appends complete: the pool is waited for)."""
        if self.thread.is_alive() and self.runner is not None:
            done = asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop)
            try:
                done.result(self.grace + 10.0)
            except Exception:  # noqa: BLE001
                log.warning("OTLP/HTTP receiver did not stop cleanly", exc_info=True)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10.0)
        self.pool.shutdown(wait=True)
        if not self.loop.is_running():
            self.loop.close()
        self.sock.close()

    # -- handlers
    async def not_found(self, request: web.Request) -> web.Response:
        return self._error_response(404, code_pb2.NOT_FOUND, f"no such path: {request.path}", False, {})

    async def handle(self, request: web.Request) -> web.Response:
        signal = PATHS[request.path]
        origin = request.headers.get("Origin")
        cors = self._cors(origin)
        if request.method == "OPTIONS":
            return self._preflight(request, origin, cors)
        ctype = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        as_json = ctype == JSON
        if request.method != "POST":
            headers = {**cors, "Allow": ALLOW}
            return self._answer(signal, 405, code_pb2.UNIMPLEMENTED, f"{request.method} not allowed", as_json, headers)
        if ctype != PROTOBUF and not as_json:
            message = f"unsupported content type {ctype!r}: use {PROTOBUF} or {JSON}"
            return self._answer(signal, 415, code_pb2.INVALID_ARGUMENT, message, False, cors)
        asked = request.headers
        key = self.tenant_key

        def metadata() -> tuple:
            return ("authorization", asked.get("Authorization", "")), (key, asked.get(key, "") if key else "")

        refused = self.intake.admit(metadata)
        if refused is not None:
            return self._refused(signal, refused, as_json, cors)
        if self.in_flight >= self.cfg.max_in_flight:  # every body held costs memory: the client retries
            self.metrics.inc("refused_requests", 1, "in_flight")
            wait = max(1, math.ceil(self.intake.retry_after_ms / 1000))
            message = f"{self.in_flight} requests in flight (otlp_http.max_in_flight); retry later"
            return self._answer(signal, 503, code_pb2.UNAVAILABLE, message, as_json, {**cors, "Retry-After": str(wait)},
                                wait)  # fmt: skip
        self.in_flight += 1
        try:
            return await self._ingest(request, signal, as_json, cors, metadata)
        finally:
            self.in_flight -= 1

    async def _ingest(self, request: web.Request, signal: str, as_json: bool, cors: dict[str, str],
                      metadata) -> web.Response:  # fmt: skip
        try:
            body = await read_body(request, self.limit)
        except BodyTooLarge:
            message = f"request body over {self.limit} bytes (after decompression)"
            return self._answer(signal, 413, code_pb2.RESOURCE_EXHAUSTED, message, as_json, cors)
        except UnsupportedEncoding as exc:
            message = f"unsupported content encoding {str(exc)!r}: use gzip or none"
            return self._answer(signal, 415, code_pb2.INVALID_ARGUMENT, message, as_json, cors)
        except MalformedRequest as exc:
            return self._answer(signal, 400, code_pb2.INVALID_ARGUMENT, str(exc), as_json, cors)
        decode = self.decoders[signal, as_json]
        loop = asyncio.get_running_loop()
        outcome = await loop.run_in_executor(self.pool, self.intake.ingest, signal, body, decode, metadata)
        if not outcome.ok:
            return self._refused(signal, outcome, as_json, cors)
        assert outcome.decoded is not None
        self.metrics.inc("requests", 1, signal, "200")
        body = encode(intake.export_response(signal, outcome.decoded), as_json)
        return web.Response(body=body, status=200, headers=cors, content_type=JSON if as_json else PROTOBUF)

    def _refused(self, signal: str, outcome: Outcome, as_json: bool, cors: dict[str, str]) -> web.Response:
        reason = outcome.refused
        if reason == intake.UNAUTHENTICATED:
            return self._answer(signal, 401, code_pb2.UNAUTHENTICATED, outcome.message, as_json, cors)
        if reason == intake.INVALID:
            return self._answer(signal, 400, code_pb2.INVALID_ARGUMENT, outcome.message, as_json, cors)
        wait = max(1, math.ceil(outcome.retry_after_s))
        headers = {**cors, "Retry-After": str(wait)}
        if reason == intake.TENANT_RATE:
            return self._answer(signal, 429, code_pb2.RESOURCE_EXHAUSTED, outcome.message, as_json, headers, wait)
        return self._answer(signal, 503, code_pb2.UNAVAILABLE, outcome.message, as_json, headers, wait)

    def _answer(self, signal: str, status: int, code: int, message: str, as_json: bool, headers: dict[str, str],
                retry_after_s: int = 0) -> web.Response:  # fmt: skip
        self.metrics.inc("requests", 1, signal, str(status))
        return self._error_response(status, code, message, as_json, headers, retry_after_s)

    @staticmethod
    def _error_response(status: int, code: int, message: str, as_json: bool, headers: dict[str, str],
                        retry_after_s: int = 0) -> web.Response:  # fmt: skip
        body = status_body(code, message, as_json, retry_after_s)
        return web.Response(body=body, status=status, headers=headers, content_type=JSON if as_json else PROTOBUF)

    # -- CORS
    def _allowed(self, origin: str | None) -> bool:
        if not origin or not self.origins:
            return False
        low = origin.lower()
        return any(fnmatch.fnmatchcase(low, pattern) for pattern in self.origins)

    def _cors(self, origin: str | None) -> dict[str, str]:
        """Headers for a response to ``origin``: none unless it is allowed."""
        if not self._allowed(origin):
            return {"Vary": "Origin"} if self.origins else {}
        assert origin is not None
        return {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": "Retry-After",
                "Vary": "Origin"}  # fmt: skip

    def _preflight(self, request: web.Request, origin: str | None, cors: dict[str, str]) -> web.Response:
        if origin is None:  # not a CORS preflight: what the path allows
            return web.Response(status=204, headers={"Allow": ALLOW})
        method = request.headers.get("Access-Control-Request-Method", "POST").strip().upper()
        asked = [h.strip() for h in request.headers.get("Access-Control-Request-Headers", "").split(",") if h.strip()]
        if "Access-Control-Allow-Origin" not in cors or method != "POST" or any(
            h.lower() not in self.allowed_headers for h in asked
        ):
            body = status_body(code_pb2.PERMISSION_DENIED, "CORS preflight refused", False)
            return web.Response(body=body, status=403, content_type=PROTOBUF, headers={"Vary": "Origin"})
        listed = {h.lower() for h in self.cfg.allowed_headers} | {"content-type"}
        allow_headers = ", ".join([self.allow_headers, *(h for h in asked if h.lower() not in listed)])
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": cors["Access-Control-Allow-Origin"],
            "Access-Control-Allow-Methods": "POST",
            "Access-Control-Allow-Headers": allow_headers,
            "Access-Control-Max-Age": str(self.cfg.cors_max_age_s),
            "Vary": "Origin",
        })  # fmt: skip
