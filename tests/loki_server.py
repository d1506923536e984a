"""A Loki push endpoint for tests: checks every request against the push protocol strictly
(method, path, headers, gzip JSON body, label names, stream and entry shapes, ordering) and
records what it accepted; a script of (status, body) answers can make it fail first."""

from __future__ import annotations

import gzip
import json
import re
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"duplicate keys {keys}")
    return dict(pairs)


def check_push(method: str, path: str, headers, body: bytes) -> dict:
    """Decode a push request exactly as Loki expects it; raise ValueError on any deviation."""
    if method != "POST" or path != "/loki/api/v1/push":
        raise ValueError(f"{method} {path}")
    if headers.get("Content-Type") != "application/json":
        raise ValueError(f"content-type {headers.get('Content-Type')}")
    if headers.get("Content-Encoding") != "gzip":
        raise ValueError(f"content-encoding {headers.get('Content-Encoding')}")
    doc = json.loads(gzip.decompress(body), object_pairs_hook=_no_duplicates)
    if not isinstance(doc, dict) or list(doc) != ["streams"] or not isinstance(doc["streams"], list):
        raise ValueError("body must be exactly {'streams': [...]}")
    for stream in doc["streams"]:
        if not isinstance(stream, dict) or set(stream) != {"stream", "values"}:
            raise ValueError(f"stream keys {stream!r}")
        labels = stream["stream"]
        if not isinstance(labels, dict) or not labels or len(labels) > 15:
            raise ValueError(f"labels {labels!r}")
        for name, value in labels.items():
            if not LABEL_NAME.match(name) or not isinstance(value, str) or not value:
                raise ValueError(f"label {name!r}={value!r}")
            if len(value.encode()) > 2048:
                raise ValueError(f"label value of {name} too long")
        last = -1
        for entry in stream["values"]:
            if not isinstance(entry, list) or len(entry) not in (2, 3):
                raise ValueError(f"entry {entry!r}")
            ts, line = entry[0], entry[1]
            if not isinstance(ts, str) or not ts.isdigit() or not isinstance(line, str):
                raise ValueError(f"entry {entry!r}")
            if len(entry) == 3 and not (
                isinstance(entry[2], dict) and all(isinstance(v, str) for v in entry[2].values())
            ):
                raise ValueError(f"structured metadata {entry[2]!r}")
            if int(ts) < last:
                raise ValueError(f"out of order in {labels}: {ts} after {last}")
            last = int(ts)
    return doc


class LokiServer:
    """ThreadingHTTPServer on 127.0.0.1:0; ``script`` holds statuses to answer first."""

    def __init__(self) -> None:
        self.script: deque[tuple[int, str]] = deque()
        self.requests = 0
        self.accepted: list[dict] = []  # decoded pushes answered 204
        self.headers: list[dict] = []
        self.violations: list[str] = []
        self.lock = threading.Lock()
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with state.lock:
                    state.requests += 1
                    try:
                        doc = check_push("POST", self.path, self.headers, body)
                    except Exception as exc:
                        state.violations.append(str(exc))
                        return self._answer(400, f"bad push: {exc}")
                    if state.script:
                        return self._answer(*state.script.popleft())
                    state.accepted.append(doc)
                    state.headers.append(dict(self.headers))
                self._answer(204, "")

            def do_GET(self) -> None:
                state.violations.append(f"GET {self.path}")
                self._answer(405, "method not allowed")

            def _answer(self, status: int, text: str) -> None:
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/loki/api/v1/push"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def lines(self) -> list[str]:
        """Every accepted line, in the order the server received them."""
        return [v[1] for doc in self.accepted for s in doc["streams"] for v in s["values"]]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
