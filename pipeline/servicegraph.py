"""Service graph: which service calls which, found by joining parent and child spans.

A child span whose parent span belongs to another service is one call
``parent service -> child service``. The join runs where the data is read, per
source partition and in read order (``JoinedSource`` wraps any partitioned
source), so its output depends on the input alone and travels in the same
stream as the span aggregates. It keeps a consistent sample of traces (by trace
id: every span of a sampled trace is kept), and spans for ``ttl`` of event time
in a few generations of dicts, so memory stays bounded. A child that arrives
before its parent waits for it.

Each step yields ``EdgePartial`` items: calls, errors and summed duration of the
child spans per (caller, callee, window). Per-service state adds them to the
caller's window; alert rankings name downstream services from them. Given the
histogram bounds, it also yields ``GraphCalls`` (``pipeline/graph_calls.py``): the
requests per (client, server, connection type) for ``/metrics``, with the virtual
nodes that CLIENT and PRODUCER spans without a child name.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from pipeline.graph_calls import CTYPE_NAMES, GraphCalls, GraphSums, peer_of
from pipeline.model import EdgePartial, SpanBatch, progress_ns
from pipeline.snapshots import check_version
from pipeline.span_index import SpanIndex

GENERATION_NS = 10_000_000_000
# Parent ids waiting for their span, per generation: beyond this, a child whose parent has not
# been seen is not kept (counted in ``unjoined``): traffic whose parents never arrive (callers
# not instrumented or not sampled) must not grow the joiner without bound within its ttl.
MAX_WAITING = 25_000  # ~100,000 over the default 30 s ttl
# Sampled spans kept as possible parents, per generation: 100,000 a second, what 400,000 spans/s
# (the 1-in-4 default sample) bring; beyond it spans are not kept (counted in ``unstored``, their
# children then wait and are counted in ``unjoined``). ~24 MiB per full generation (SpanIndex).
MAX_SPANS = 1_000_000
# Service names known by code: beyond this, codes are renumbered to the services still held
# when a generation expires.
MAX_NAMES = 4096
STATE_VERSION = 2  # of the pickled joiner in recovery snapshots (2: versioned; the config bound at start)


class LinkJoiner:
    """Joins sampled spans to their parents across batches. Picklable."""

    def __init__(
        self, sample_one_in: int, ttl_ns: int, window_ns: int, bounds: tuple[float, ...] | None = None
    ) -> None:
        self.sample = sample_one_in
        self.ttl_ns = ttl_ns
        self.window_ns = window_ns
        self.bounds = None if bounds is None else np.asarray(bounds, dtype=np.float64)  # None: no GraphCalls
        self.names: list[str] = []  # service code -> name, as first seen
        self.codes: dict[str, int] = {}
        self.generations: list[tuple[int, SpanIndex]] = []  # (generation, span id -> service code)
        # (generation, parent id -> {(callee, window start): [calls, errors, duration sum, max end,
        # {bucket: weighted calls}, weighted failed, weighted duration sum]}):
        # children waiting for their parent, summed per callee and window, so a parent that never
        # comes costs one entry per callee and window however many children name it (a client
        # that reuses span ids made these lists grow by thousands a second, and every snapshot
        # pickled them).
        self.waiting: list[tuple[int, dict[int, dict[tuple[str, int], list]]]] = []
        # (generation, span id -> (client, server, connection type, weight, failed, seconds, end, bucket)):
        # CLIENT and PRODUCER spans naming a peer, waiting for a child; none in time: a virtual node
        self.pending: list[tuple[int, dict[int, tuple]]] = []
        self.high = 0
        self.unjoined = 0  # children not kept to wait: MAX_WAITING reached
        self.unstored = 0  # sampled spans not kept as possible parents: MAX_SPANS reached

    def bind(self, sample_one_in: int, ttl_ns: int, window_ns: int, bounds: tuple[float, ...] | None = None) -> None:
        """Apply the configuration in force (after a restart from a snapshot). Children waiting
        under windows of another length move to the window of the new length that holds their
        newest end."""
        if window_ns != self.window_ns:
            for _, table in self.waiting:
                for parent_id, children in table.items():
                    moved: dict[tuple[str, int], list] = {}
                    for (callee, _), (calls, errors, dur, end, buckets, w_failed, w_dur) in children.items():
                        c = moved.setdefault((callee, end // window_ns * window_ns), [0, 0, 0.0, 0, {}, 0, 0.0])
                        c[0], c[1], c[2], c[3] = c[0] + calls, c[1] + errors, c[2] + dur, max(c[3], end)
                        c[5], c[6] = c[5] + w_failed, c[6] + w_dur
                        for b, n in buckets.items():
                            c[4][b] = c[4].get(b, 0) + n
                    table[parent_id] = moved
        if bounds is not None and (self.bounds is None or tuple(self.bounds.tolist()) != tuple(bounds)):
            for _, table in self.waiting:  # waited under other buckets: their requests are not counted
                for children in table.values():
                    for c in children.values():
                        c[4].clear()
        self.sample, self.ttl_ns, self.window_ns = sample_one_in, ttl_ns, window_ns
        self.bounds = None if bounds is None else np.asarray(bounds, dtype=np.float64)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "version": STATE_VERSION}

    def __setstate__(self, state: dict) -> None:
        """Converts snapshots of earlier versions: waiting children as a list of child tuples,
        and span ids in a dict of service names."""
        check_version("the service graph", state.pop("version", 1), STATE_VERSION)
        self.__dict__.update(state)
        self.__dict__.setdefault("unjoined", 0)
        self.__dict__.setdefault("unstored", 0)
        self.__dict__.setdefault("pending", [])
        self.__dict__.setdefault("bounds", None)
        for _, table in self.waiting:
            for parent_id, children in table.items():
                if isinstance(children, list):
                    summed: dict[tuple[str, int], list] = {}
                    for callee, error, dur, end in children:
                        self._wait(summed, callee, error, dur, end, -1, 1)
                    table[parent_id] = summed
                for c in table[parent_id].values():
                    if len(c) == 4:  # before the service-graph metrics: not counted there
                        c.extend(({}, 0, 0.0))
        if "names" not in state:
            self.names, self.codes = [], {}
            generations = []
            old: list = self.generations  # (generation, dict of span id -> service name) in those snapshots
            for gen, spans in old:
                index = SpanIndex(max(MAX_SPANS, len(spans)))
                ids = np.fromiter(spans.keys(), dtype=np.uint64, count=len(spans))
                index.insert(ids, np.fromiter(map(self._code, spans.values()), dtype=np.int32, count=len(spans)))
                generations.append((gen, index))
            self.generations = generations

    def _code(self, service: str) -> int:
        code = self.codes.get(service)
        if code is None:
            code = self.codes[service] = len(self.names)
            self.names.append(service)
        return code

    def process(self, batch: SpanBatch) -> list[EdgePartial | GraphCalls]:
        n = len(batch)
        if n == 0:
            return []
        halves = np.frombuffer(batch.trace_id.tobytes(), dtype="<u8").reshape(n, 2)
        mixed = ((halves[:, 0] ^ halves[:, 1]) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)  # hash the id
        keep = np.flatnonzero(mixed % np.uint64(self.sample) == 0) if self.sample > 1 else np.arange(n)
        if keep.size == 0:
            return []
        # Spans are stored and parents looked up by compiled loops over the batch (SpanIndex),
        # callers and callees are service codes, and found pairs are summed with numpy: only
        # children whose parent has not arrived run Python per span.
        sid = np.frombuffer(batch.span_id.tobytes(), dtype="<u8")[keep]
        pid_arr = np.frombuffer(batch.parent_span_id.tobytes(), dtype="<u8")[keep]
        service_code = np.array([self._code(s) for s in batch.services], dtype=np.int32)
        me = service_code[batch.service_idx[keep]]
        # generations follow event time, but no further than the batch's acceptance time (a
        # client's clock running ahead must not expire every stored span)
        self.high = max(self.high, progress_ns(int(batch.end_ns.max()), batch.received_ns))
        gen = self.high // GENERATION_NS
        if not self.generations or self.generations[-1][0] < gen:
            self.generations.append((gen, SpanIndex(MAX_SPANS)))
        self.unstored += self.generations[-1][1].insert(sid, me)
        waiting = self._current(self.waiting, gen)
        edges: dict[tuple[str, str, int], list] = defaultdict(lambda: [0, 0, 0.0, 0])
        graph = GraphSums(self.bounds, self.sample) if self.bounds is not None else None

        paired: set[int] = set()  # spans of this batch or earlier ones that got a child now
        if any(table for _, table in self.waiting):
            paired = self._join_waiting(sid, edges, graph)
        # This batch's children: parent found (in any generation) or left waiting for it.
        with_parent = np.flatnonzero(pid_arr)
        pids = pid_arr[with_parent]
        caller = np.full(pids.size, -1, dtype=np.int32)
        for _, index in reversed(self.generations):
            index.lookup(pids, caller)
        callee = me[with_parent]
        cross = np.flatnonzero((caller >= 0) & (caller != callee))
        if cross.size:
            self._join_found(batch, keep[with_parent[cross]], caller[cross], callee[cross], edges, graph)
        lost = np.flatnonzero(caller < 0)
        if lost.size:
            self._leave_waiting(batch, keep[with_parent[lost]], pids[lost], callee[lost], waiting)
        if graph is not None:
            self._peers(batch, keep, sid, gen, paired, pids[caller >= 0], graph)
        expired = self._expire(gen)
        out: list[EdgePartial | GraphCalls] = [
            EdgePartial(src, dst, w, progress_ns(e[3], batch.received_ns), batch.step, e[0], e[1], e[2])
            for (src, dst, w), e in sorted(edges.items())
        ]
        if graph is not None:
            for table in expired:  # CLIENT and PRODUCER spans no child came for: virtual nodes
                for client, server, ctype, w, failed, seconds, end, bucket in table.values():
                    graph.add_summed((client, server, ctype), {bucket: w}, w * failed, w * seconds, end)
            out.extend(graph.records())
        return out

    def _peers(self, batch: SpanBatch, keep: np.ndarray, sid: np.ndarray, gen: int, paired: set[int],
               found: np.ndarray, graph: GraphSums) -> None:  # fmt: skip
        """Database calls count at once; other CLIENT and PRODUCER spans that name a peer wait for
        a child (none within the ttl: a virtual node); spans that got a child (``paired``: children
        that waited, ``found``: this batch's children's parents) stop waiting or never start."""
        if any(table for _, table in self.pending):
            gone = paired | set(found.tolist())
            for _, table in self.pending:
                for span in gone & table.keys():
                    del table[span]
        name, ctype = peer_of(batch, keep)
        rows = np.flatnonzero(name >= 0)
        if not rows.size:
            return
        rows = rows[~np.isin(sid[rows], found)]  # called, and the callee answered in this very batch
        values, names = batch.attr_values, batch.services
        r = keep[rows]
        w = batch.weights()[r]
        failed = batch.status[r] == 2
        seconds = batch.duration_ns[r] / 1e9
        client = batch.service_idx[r]
        db = ctype[rows] == 1
        if db.any():
            for c, v in sorted(set(zip(client[db].tolist(), name[rows][db].tolist(), strict=True))):
                m = db & (client == c) & (name[rows] == v)
                graph.add_spans((names[c], values[v], CTYPE_NAMES[1]), w[m], failed[m], seconds[m], batch.end_ns[r][m])
        table = self._current(self.pending, gen)
        ends = batch.end_ns[r]
        buckets = graph.bucket(seconds)
        for j in np.flatnonzero(~db).tolist():
            span = int(sid[rows[j]])
            if span in paired:
                continue
            if len(table) >= MAX_WAITING:
                self.unstored += 1
                continue
            table[span] = (names[int(client[j])], values[int(name[rows[j]])], CTYPE_NAMES[int(ctype[rows[j]])],
                           int(w[j]), bool(failed[j]), float(seconds[j]), int(ends[j]), int(buckets[j]))  # fmt: skip

    def _join_waiting(self, sid: np.ndarray, edges: dict, graph: GraphSums | None) -> set[int]:
        """Children that were waiting for one of these spans (``sid``) join them now; returns the
        ids of those spans."""
        arrived = set(sid.tolist())
        joined: set[int] = set()
        for _, table in self.waiting:
            found = list(table.keys() & arrived)
            if not found:
                continue
            joined.update(found)
            callers = np.full(len(found), -1, dtype=np.int32)
            self.generations[-1][1].lookup(np.array(found, dtype=np.uint64), callers)
            for parent_id, code in zip(found, callers.tolist()):
                if code < 0:  # not stored (MAX_SPANS): it keeps waiting
                    continue
                parent_service = self.names[code]
                for (child_service, window_start), c in table.pop(parent_id).items():
                    if child_service != parent_service:
                        e = edges[(parent_service, child_service, window_start)]
                        e[0] += c[0]
                        e[1] += c[1]
                        e[2] += c[2]
                        e[3] = max(e[3], c[3])
                        if graph is not None:
                            graph.add_summed((parent_service, child_service, ""), c[4], c[5], c[6], c[3])
        return joined

    def _join_found(self, batch: SpanBatch, rows: np.ndarray, a: np.ndarray, b: np.ndarray, edges: dict,
                    graph: GraphSums | None) -> None:  # fmt: skip
        """This batch's children (``rows``) whose parent was found: caller codes ``a``, callee
        codes ``b``, summed per (caller, callee, window) with numpy."""
        window = batch.end_ns[rows] // self.window_ns * self.window_ns
        order = np.lexsort((window, b, a))
        a, b, window, rows = a[order], b[order], window[order], rows[order]
        # np.concatenate, not np.r_: r_ costs ~10 us a call, felt with small batches
        change = (a[1:] != a[:-1]) | (b[1:] != b[:-1]) | (window[1:] != window[:-1])
        first = np.flatnonzero(np.concatenate(([True], change)))
        calls = np.diff(np.append(first, len(rows)))
        errors = np.add.reduceat(batch.status[rows] == 2, first)
        dur_sum = np.add.reduceat(batch.duration_ns[rows] / 1e9, first)
        max_end = np.maximum.reduceat(batch.end_ns[rows], first)
        weights = batch.weights() if graph is not None else None
        for k, at in enumerate(first.tolist()):
            e = edges[(self.names[a[at]], self.names[b[at]], int(window[at]))]
            e[0] += int(calls[k])
            e[1] += int(errors[k])
            e[2] += float(dur_sum[k])
            e[3] = max(e[3], int(max_end[k]))
            if graph is not None and weights is not None:
                seg = rows[at : at + int(calls[k])]
                graph.add_spans((self.names[a[at]], self.names[b[at]], ""), weights[seg],
                                batch.status[seg] == 2, batch.duration_ns[seg] / 1e9, batch.end_ns[seg])  # fmt: skip

    def _leave_waiting(
        self, batch: SpanBatch, rows: np.ndarray, parents: np.ndarray, callee: np.ndarray, waiting: dict
    ) -> None:
        """This batch's children (``rows``) whose parent has not arrived wait for it, summed per
        (callee, window); at most MAX_WAITING parent ids per generation (the rest counted)."""
        err = (batch.status[rows] == 2).tolist()
        dur = (batch.duration_ns[rows] / 1e9).tolist()
        end = batch.end_ns[rows].tolist()
        if self.bounds is not None:
            bucket = np.searchsorted(self.bounds, dur, side="left").tolist()
        else:
            bucket = [-1] * rows.size
        weight = batch.weights()[rows].tolist()
        for parent_id, code, error, d, e, bk, w in zip(parents.tolist(), callee.tolist(), err, dur, end, bucket,
                                                       weight):  # fmt: skip
            children = waiting.get(parent_id)
            if children is None:
                if len(waiting) >= MAX_WAITING:
                    self.unjoined += 1
                    continue
                children = waiting[parent_id] = {}
            self._wait(children, self.names[code], error, d, e, bk, w)

    def _wait(self, children: dict, callee: str, error: bool, dur: float, end: int, bucket: int, w: int) -> None:
        c = children.setdefault((callee, end // self.window_ns * self.window_ns), [0, 0, 0.0, 0, {}, 0, 0.0])
        c[0] += 1
        c[1] += error
        c[2] += dur
        c[3] = max(c[3], end)
        if bucket >= 0:  # -1: counted before the service-graph metrics
            c[4][bucket] = c[4].get(bucket, 0) + w
            c[5] += w * error
            c[6] += w * dur

    @staticmethod
    def _current(gens: list, gen: int) -> dict:
        if not gens or gens[-1][0] < gen:
            gens.append((gen, {}))
        return gens[-1][1]

    def _expire(self, gen: int) -> list[dict[int, tuple]]:
        """Drop the generations older than the ttl; returns the CLIENT and PRODUCER spans that
        waited in them for a child in vain."""
        oldest = gen - max(1, self.ttl_ns // GENERATION_NS)
        if self.generations[0][0] < oldest and len(self.names) > MAX_NAMES:
            self.generations = [(g, t) for g, t in self.generations if g >= oldest]
            self._renumber()
        self.generations = [(g, t) for g, t in self.generations if g >= oldest]
        self.waiting = [(g, t) for g, t in self.waiting if g >= oldest]
        expired = [t for g, t in self.pending if g < oldest]
        if expired:
            self.pending = [(g, t) for g, t in self.pending if g >= oldest]
        return expired

    def _renumber(self) -> None:
        """Service codes of the kept generations only, numbered afresh: service names that
        come and go (e.g. one per deployment) must not pile up in ``names`` over months."""
        used = np.unique(np.concatenate([index.codes() for _, index in self.generations]))
        new = np.full(len(self.names), -1, dtype=np.int32)
        new[used] = np.arange(used.size, dtype=np.int32)
        for _, index in self.generations:
            index.recode(new)
        self.names = [self.names[c] for c in used.tolist()]
        self.codes = {name: i for i, name in enumerate(self.names)}
