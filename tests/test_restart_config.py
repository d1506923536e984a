"""The config on disk is the config in force: a restart from a recovery snapshot applies the
configuration the daemon was started with, not the one the snapshot was taken under."""

import dataclasses
import pickle
from datetime import timedelta

import numpy as np
import pytest
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSink, TestingSource, run_main

from pipeline.config import (
    AnomalyConfig,
    Config,
    PrometheusConfig,
    RuleConfig,
    ScalingConfig,
    ServiceScalingConfig,
    WindowsConfig,
)
from pipeline.flow import Outputs, build_flow
from pipeline.model import AlertEvent, KeyExpired, ScalingUpdate, SpanBatch, WindowResult
from pipeline.preaggregate import WindowSpec
from pipeline.selfmetrics import SelfMetrics
from pipeline.service import STATE_VERSION, ServiceState, SnapshotTooNew

S = 10**9
T0 = 1_700_000_000 * S


def second(t: int, ops: dict[str, tuple[int, int]]) -> SpanBatch:
    """One second of SERVER spans of the service "shop": operation -> (spans, errors among them)."""
    names = tuple(ops)
    op_idx = np.concatenate([np.full(n, i, np.int32) for i, (n, _) in enumerate(ops.values())])
    status = np.concatenate([np.r_[np.full(e, 2), np.zeros(n - e)] for n, e in ops.values()]).astype(np.int8)
    n = op_idx.size
    ids = np.arange(1, n + 1, dtype=">u8").tobytes()
    return SpanBatch(
        services=("shop",), operations=names, instances=("pod-1",), service_idx=np.zeros(n, np.int32), op_idx=op_idx,
        instance_idx=np.zeros(n, np.int32), kind=np.full(n, 2, np.int8), status=status,
        end_ns=T0 + t * S + np.linspace(0, S - 1, n).astype(np.int64), duration_ns=np.full(n, 10**7, np.int64),
        trace_id=np.full(n, b"\x01" * 16, "S16"),
        span_id=np.frombuffer(ids, "S8"), parent_span_id=np.zeros(n, "S8"),
    )  # fmt: skip


def run(cfg: Config, items: list, db) -> list:
    got: list = []
    metrics = SelfMetrics()
    flow = build_flow(cfg, TestingSource(items), Outputs(result_sinks=[TestingSink(got)]), metrics, idle_close=False,
                      close_at_eof=False)  # fmt: skip
    run_main(flow, epoch_interval=timedelta(seconds=1), recovery_config=RecoveryConfig(str(db)))
    return got


def test_a_restart_applies_the_changed_config_within_a_window(tmp_path):
    before = Config(
        windows=WindowsConfig(length_s=10.0, allowed_lateness_s=0.0),
        scaling=ScalingConfig(target_rps_per_replica=1.0, max_replicas=100,
                              services=(ServiceScalingConfig(name="other", max_replicas=7),)),
        anomaly=AnomalyConfig(rules=(RuleConfig(name="errors", feature="error_rate", above=0.05, for_s=10.0),)),
    )  # fmt: skip
    after = dataclasses.replace(
        before,
        windows=WindowsConfig(length_s=5.0, allowed_lateness_s=0.0),
        scaling=dataclasses.replace(before.scaling, max_replicas=3),
        anomaly=AnomalyConfig(rules=()),  # the rule was removed
        prometheus=PrometheusConfig(stale_after_s=30.0, service_stale_after_s=3600.0),
    )
    # 10 minutes with ~80 calls/s and an error-prone operation, then a restart, then 2 minutes without it
    items = [dataclasses.replace(second(t, {"GET /a": (80, 0), "GET /b": (4, 2)}), step=(0, t)) for t in range(600)]
    items.append(TestingSource.EOF())
    items += [dataclasses.replace(second(t, {"GET /a": (80, 0)}), step=(0, t)) for t in range(600, 720)]
    db = tmp_path / "recovery"
    db.mkdir()
    init_db_dir(db, 1)

    first = run(before, items, db)
    scaling = [x for x in first if isinstance(x, ScalingUpdate)]
    assert scaling[-1].desired >= 80  # 80 calls/s at 1 per replica
    fired = [x for x in first if isinstance(x, AlertEvent) and x.source == "rule:errors"]
    assert [x.state for x in fired] == ["firing"]

    second_run = run(after, items, db)
    scaling = [x for x in second_run if isinstance(x, ScalingUpdate)]
    assert scaling and max(x.desired for x in scaling) == 3  # scaling.max_replicas in force from the first window
    windows = sorted({(x.window_start, x.window_end) for x in second_run if isinstance(x, WindowResult)})
    assert windows[0][1] - windows[0][0] == 10 * S  # the window open at the restart closes as it was built
    assert {e - s for s, e in windows[1:]} == {5 * S}  # windows.length_s in force after it
    removed = [x for x in second_run if isinstance(x, AlertEvent) and x.source == "rule:errors"]
    assert [(x.state, x.reason) for x in removed] == [("resolved", "rule_removed")]
    # prometheus.stale_after_s in force: GET /b, gone since the restart, is retired 30 s after its last window
    (expired,) = [x for x in second_run if isinstance(x, KeyExpired)]
    assert expired.operation == "GET /b" and expired.time <= T0 + (590 + 30 + 5) * S


def test_snapshots_hold_no_config_and_carry_a_version():
    cfg = Config()
    spec = WindowSpec.from_config(cfg.windows, cfg.prometheus.buckets)
    state = ServiceState(cfg, spec, "shop")
    blob = pickle.dumps(state)
    assert b"ScalingConfig" not in blob and b"AnomalyConfig" not in blob and b"WindowsConfig" not in blob
    back = pickle.loads(blob)
    assert back.__getstate__()["version"] == STATE_VERSION
    newer = state.__getstate__()
    newer["version"] = STATE_VERSION + 1
    with pytest.raises(SnapshotTooNew, match="format .* this telepipe reads formats up to"):
        ServiceState.__new__(ServiceState).__setstate__(newer)


def test_a_snapshot_written_before_snapshots_had_versions_is_read_and_runs(tmp_path):
    """tests/data/service_state_before_versions.pickle: the frontend's ServiceState after four loops of the
    OnlineBoutique recording, pickled by the version before this format (configuration inside)."""
    from pathlib import Path

    from bench.amplify import load
    from pipeline.preaggregate import preaggregate

    from .conftest import ONLINEBOUTIQUE

    blob = (Path(__file__).parent / "data" / "service_state_before_versions.pickle").read_bytes()
    state = pickle.loads(blob)
    cfg = dataclasses.replace(Config(), scaling=ScalingConfig(max_replicas=1))
    spec = WindowSpec.from_config(cfg.windows, cfg.prometheus.buckets)
    state.bind(cfg, spec, None, None)
    assert state.anomaly.cfg is cfg.anomaly and state.scaler.targets.max_replicas == 1
    assert len(state.anomaly.keys) == 12 and state.windows.open
    later = 10**12  # shift the recording past the snapshot's windows
    out = []
    for k, b in enumerate(x for x in load([ONLINEBOUTIQUE]) if isinstance(x, SpanBatch)):
        b = dataclasses.replace(b, end_ns=b.end_ns + later, step=(0, 10_000 + k))
        for p in preaggregate(b, spec):
            if p.service == "frontend":
                out += state.on_item(p, 0.0)
    out += state.close_all()
    assert [x for x in out if isinstance(x, WindowResult)] and [x for x in out if isinstance(x, ScalingUpdate)]
    assert pickle.loads(pickle.dumps(state)).__getstate__()["version"] == STATE_VERSION
