"""The ``telepipe`` command: run, replay, check-config."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from pipeline import config_file as config_mod
from pipeline.config import Config, ConfigError

SCALE_OUT = (
    "scale-out: --processes N runs N processes on this machine as one cluster (shared OTLP ports, "
    "/metrics on the HTTP port + i); --process-id/--addresses join a cluster spanning machines"
)


def _load(args) -> Config:
    cfg = config_mod.load(getattr(args, "config", None))
    return config_mod.override(
        cfg,
        otlp={"grpc_listen": getattr(args, "otlp_grpc", None)},
        otlp_http={"listen": getattr(args, "otlp_http", None)},
        http={"listen": getattr(args, "http", None)},
        spool={"data_dir": getattr(args, "data_dir", None)},
        loki={"url": getattr(args, "loki_url", None)},
        keda={"listen": getattr(args, "keda", None)},
        remote_write={"url": getattr(args, "remote_write_url", None)},
        output={"emit_jsonl": getattr(args, "emit_jsonl", None), "record_dir": getattr(args, "record", None)},
    )


def _parse_speed(value: str) -> float | None:
    if value == "max":
        return None
    try:
        speed = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--speed: 'max' or a positive factor, got {value!r}") from None
    if speed <= 0:
        raise argparse.ArgumentTypeError(f"--speed: must be > 0, got {value!r}")
    return speed


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"a whole number >= 1, got {value!r}")
    return n


def _cluster_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--processes", type=_positive_int, default=1, metavar="N",
                   help="run N processes on this machine as one bytewax cluster (default 1)")  # fmt: skip
    p.add_argument("--process-id", type=int, metavar="I", help="this process's index in --addresses")
    p.add_argument("--addresses", metavar="HOST:PORT,...",
                   help="bytewax cluster addresses of every process, in process-id order")  # fmt: skip


def _cluster(args) -> tuple[int, list[str] | None] | str:
    """(process id, addresses) from the flags, or an error message."""
    if args.process_id is None and args.addresses is None:
        return 0, None
    if args.processes != 1:
        return "--processes starts a cluster itself; do not combine it with --process-id/--addresses"
    if args.process_id is None or args.addresses is None:
        return "--process-id and --addresses go together"
    addresses = [a.strip() for a in args.addresses.split(",") if a.strip()]
    if not 0 <= args.process_id < len(addresses):
        return f"--process-id {args.process_id} is not an index of the {len(addresses)} --addresses"
    return args.process_id, addresses


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="telepipe",
        description="Streaming telemetry pipeline: OTLP traces, logs and metrics in (gRPC and HTTP); "
        "latency percentiles, RED metrics, anomalies, incidents and scaling signals on /metrics, logs and "
        "events to Loki out; sampled spans weighted by their tracestate threshold; database statements, slow "
        "queries and N+1 findings; dimensions; service-graph requests with virtual nodes; exceptions from span "
        "events; exemplars; span names with ids folded into templates.",
        epilog=SCALE_OUT,
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon", epilog=SCALE_OUT)
    run.add_argument("--config", help="TOML config file (default: embedded defaults)")
    run.add_argument("--otlp-grpc", metavar="HOST:PORT", help="OTLP gRPC listen address (default 127.0.0.1:4317)")
    run.add_argument("--otlp-http", metavar="HOST:PORT",
                     help="OTLP/HTTP listen address (default 127.0.0.1:4318; empty: off)")  # fmt: skip
    run.add_argument("--http", metavar="HOST:PORT", help="/metrics, /healthz, /readyz address (default 127.0.0.1:9464)")
    run.add_argument("--data-dir", metavar="DIR", help="spool and state directory (default ./.telepipe)")
    run.add_argument("--loki-url", metavar="URL", help="Loki push URL (default: no Loki sink)")
    run.add_argument("--emit-jsonl", metavar="FILE", help="also write every window result as a JSON line")
    run.add_argument("--record", metavar="DIR", help="also write every accepted request to a native recording")
    run.add_argument("--keda", metavar="HOST:PORT", help="serve the KEDA external scaler here (default: off)")
    run.add_argument("--remote-write-url", metavar="URL", help="Prometheus remote write URL (default: off)")
    _cluster_arguments(run)

    rep = sub.add_parser("replay", help="run the dataflow over recordings and exit when they end")
    rep.add_argument("paths", nargs="+", metavar="PATH", help="OTLP/JSON lines (.jsonl[.zst|.gz]) or native recordings")
    rep.add_argument("--config", help="TOML config file")
    rep.add_argument("--speed", type=_parse_speed, default=None, metavar="max|FACTOR",
                     help="max (default) or a factor of recorded time")  # fmt: skip
    rep.add_argument("--emit-jsonl", metavar="FILE", help="write every window result as a JSON line")
    rep.add_argument("--loki-url", metavar="URL", help="also push the recording's logs to Loki")
    rep.add_argument("--progress", action="store_true", help="print progress to stderr every second")
    _cluster_arguments(rep)

    chk = sub.add_parser("check-config", help="validate a config file and print the effective config")
    chk.add_argument("file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        if args.command == "check-config":
            cfg = config_mod.load(args.file)
            print(f"{args.file}: ok")
            print(cfg)
            return 0
        cfg = _load(args)
    except ConfigError as exc:
        print(f"telepipe: config error: {exc}", file=sys.stderr)
        return 2

    cluster = _cluster(args)
    if isinstance(cluster, str):
        print(f"telepipe: {cluster}", file=sys.stderr)
        return 2
    process_id, addresses = cluster
    if args.processes > 1:
        return _supervise(args, cfg, sys.argv[1:] if argv is None else argv)

    from telepipe import daemon  # imported late: bytewax and grpc load slowly

    if args.command == "replay":
        try:
            summary, _ = daemon.replay(
                cfg, args.paths, speed=args.speed, emit_jsonl=args.emit_jsonl, progress=args.progress,
                process_id=process_id, addresses=addresses,
            )  # fmt: skip
        except FileNotFoundError as exc:
            print(f"telepipe: {exc}", file=sys.stderr)
            return 2
        rate = summary.spans / summary.seconds if summary.seconds else 0.0
        part = f"process {process_id}: " if addresses else ""
        print(
            f"{part}replayed {summary.spans} spans into {summary.windows} windows "
            f"({summary.late} late) in {summary.seconds:.2f} s: {rate:,.0f} spans/s",
            file=sys.stderr,
        )
        return 0

    d = daemon.Daemon(cfg, process_id=process_id, addresses=addresses)

    def on_signal(signum, _frame) -> None:
        logging.getLogger("telepipe").info("signal %d: draining and stopping", signum)
        import threading

        threading.Thread(target=d.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    d.run()
    return 0


def _supervise(args, cfg: Config, argv: list[str]) -> int:
    """``--processes N``: start N children of this command as one cluster and wait for them."""
    from telepipe import cluster

    extra = None
    if args.command == "run":
        from telepipe.daemon import _host_port, init_recovery

        if cfg.recovery.enabled:
            from pathlib import Path

            init_recovery(Path(cfg.spool.data_dir) / "recovery")
        host, port = _host_port(cfg.http.listen)
        argv = cluster.strip_option(argv, "--http")
        extra = [["--http", f"{host}:{port + i}"] for i in range(args.processes)]
    return cluster.supervise(cluster.child_argvs(argv, args.processes, extra))


if __name__ == "__main__":
    sys.exit(main())
