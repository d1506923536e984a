"""``/metrics``, ``/healthz`` and ``/readyz`` on one HTTP address (the standard library's
threading server: one thread per connection, idle kept-alive ones closed after 120 s)."""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sinks.prometheus.exposition import CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE

log = logging.getLogger("telepipe.prometheus")


def _accepts_openmetrics(accept: str) -> bool:
    """Whether an Accept header asks for OpenMetrics (Prometheus sends it first when exemplar
    storage is on); ``q=0`` refuses it."""
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if media.lower() == "application/openmetrics-text":
            return not any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params)
    return False


def _accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header allows gzip (``gzip;q=0`` refuses it)."""
    for part in accept_encoding.split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip().lower() in ("gzip", "*"):
            q = params.strip().removeprefix("q=").strip() if params.strip().startswith("q=") else "1"
            try:
                return float(q) > 0
            except ValueError:
                return False
    return False


class MetricsHttpServer:
    """``/metrics``, ``/healthz`` (liveness) and ``/readyz`` (readiness) on one address.

    ``/metrics`` is sent with chunked transfer encoding as ``render()`` produces it
    (a scraper can tell a cut-off page from a whole one), gzip-compressed when the
    scraper accepts it (Prometheus does; level 1: the page is repetitive text and
    higher levels cost CPU the dataflow needs for little gain).
    """

    def __init__(
        self, host: str, port: int, render: Callable[[bool], Iterable[bytes]], ready: Callable[[], tuple[bool, str]]
    ) -> None:
        """``render(openmetrics)``: the page, OpenMetrics (with exemplars) when the scraper asks for it."""
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive for scrapers, chunked /metrics
            timeout = 120  # an idle kept-alive connection is closed (and its thread ends)

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self.send_metrics()
                    return
                if path == "/healthz":
                    body, code = b"ok\n", 200
                elif path == "/readyz":
                    ok, why = outer.ready()
                    body, code = (why + "\n").encode(), 200 if ok else 503
                else:
                    body, code = b"not found\n", 404
                self.send_response(code)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def send_metrics(self) -> None:
                gzipped = _accepts_gzip(self.headers.get("Accept-Encoding", ""))
                openmetrics = _accepts_openmetrics(self.headers.get("Accept", ""))
                chunked = self.request_version != "HTTP/1.0"  # an HTTP/1.0 client reads to the close
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", OPENMETRICS_CONTENT_TYPE if openmetrics else CONTENT_TYPE)
                    if chunked:
                        self.send_header("Transfer-Encoding", "chunked")
                    else:
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    if gzipped:
                        self.send_header("Content-Encoding", "gzip")
                    self.end_headers()
                    packer = zlib.compressobj(1, zlib.DEFLATED, 31) if gzipped else None
                    for chunk in outer.render(openmetrics):
                        self.write_chunk(packer.compress(chunk) if packer else chunk, chunked)
                    if packer:
                        self.write_chunk(packer.flush(), chunked)
                    if chunked:
                        self.wfile.write(b"0\r\n\r\n")
                except OSError:  # the scraper went away (its timeout, a reset): nothing to answer
                    self.close_connection = True

            def write_chunk(self, data: bytes, chunked: bool) -> None:
                if data:
                    self.wfile.write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)

            def log_message(self, fmt: str, *args) -> None:
                log.debug("http: " + fmt, *args)

        self.render = render
        self.ready = ready
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
