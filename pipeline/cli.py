"""The ``telepipe`` command: run, replay, check-config."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from pipeline import config as config_mod
from pipeline.config import Config, ConfigError

NOT_BUILT_YET = "not built yet: multi-process scale-out (--processes)"


def _load(args) -> Config:
    cfg = config_mod.load(getattr(args, "config", None))
    return config_mod.override(
        cfg,
        otlp={"grpc_listen": getattr(args, "otlp_grpc", None)},
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="telepipe",
        description="Streaming telemetry pipeline: OTLP traces and logs in; latency percentiles, "
        "RED metrics on /metrics and logs to Loki out.",
        epilog=NOT_BUILT_YET,
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon", epilog=NOT_BUILT_YET)
    run.add_argument("--config", help="TOML config file (default: embedded defaults)")
    run.add_argument("--otlp-grpc", metavar="HOST:PORT", help="OTLP gRPC listen address (default 127.0.0.1:4317)")
    run.add_argument("--http", metavar="HOST:PORT", help="/metrics, /healthz, /readyz address (default 127.0.0.1:9464)")
    run.add_argument("--data-dir", metavar="DIR", help="spool and state directory (default ./.telepipe)")
    run.add_argument("--loki-url", metavar="URL", help="Loki push URL (default: no Loki sink)")
    run.add_argument("--emit-jsonl", metavar="FILE", help="also write every window result as a JSON line")
    run.add_argument("--record", metavar="DIR", help="also write every accepted request to a native recording")
    run.add_argument("--keda", metavar="HOST:PORT", help="serve the KEDA external scaler here (default: off)")
    run.add_argument("--remote-write-url", metavar="URL", help="Prometheus remote write URL (default: off)")

    rep = sub.add_parser("replay", help="run the dataflow over recordings and exit when they end")
    rep.add_argument("paths", nargs="+", metavar="PATH", help="OTLP/JSON lines (.jsonl[.zst|.gz]) or native recordings")
    rep.add_argument("--config", help="TOML config file")
    rep.add_argument("--speed", type=_parse_speed, default=None, metavar="max|FACTOR",
                     help="max (default) or a factor of recorded time")  # fmt: skip
    rep.add_argument("--emit-jsonl", metavar="FILE", help="write every window result as a JSON line")
    rep.add_argument("--loki-url", metavar="URL", help="also push the recording's logs to Loki")
    rep.add_argument("--progress", action="store_true", help="print progress to stderr every second")

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

    from pipeline import daemon  # imported late: bytewax and grpc load slowly

    if args.command == "replay":
        try:
            summary, _ = daemon.replay(
                cfg, args.paths, speed=args.speed, emit_jsonl=args.emit_jsonl, progress=args.progress
            )
        except FileNotFoundError as exc:
            print(f"telepipe: {exc}", file=sys.stderr)
            return 2
        rate = summary.spans / summary.seconds if summary.seconds else 0.0
        print(
            f"replayed {summary.spans} spans into {summary.windows} windows "
            f"({summary.late} late) in {summary.seconds:.2f} s: {rate:,.0f} spans/s",
            file=sys.stderr,
        )
        return 0

    d = daemon.Daemon(cfg)
    logging.getLogger("telepipe").warning(NOT_BUILT_YET)

    def on_signal(signum, _frame) -> None:
        logging.getLogger("telepipe").info("signal %d: draining and stopping", signum)
        import threading

        threading.Thread(target=d.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    d.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
