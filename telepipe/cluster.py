"""``--processes N``: run N telepipe processes on this machine as one bytewax cluster.

The supervisor (the process the user started) picks N free loopback ports for
bytewax's cluster addresses, prepares what must exist once (the recovery
partition), and starts N children of the same command with ``--process-id i
--addresses a0,...``. Each child is a full telepipe process: its own OTLP
receiver on the shared port (SO_REUSEPORT), its own spool shard, its own
``/metrics`` on the HTTP port + i; bytewax exchanges keyed (per-service) state
between them. The supervisor forwards SIGTERM/SIGINT, and if one child dies the
others are stopped too (a bytewax cluster cannot go on without a member): the
supervisor exits non-zero and whatever restarts it (systemd, Kubernetes) starts
the cluster again, which resumes from its snapshots.

For several machines, start each member yourself with ``--process-id`` and
``--addresses`` (docs/scale-out.md).
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time

log = logging.getLogger("telepipe")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def strip_option(argv: list[str], name: str) -> list[str]:
    """argv without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def child_argvs(argv: list[str], processes: int, extra: list[list[str]] | None = None) -> list[list[str]]:
    """The command line of each child: the user's, without --processes, plus its place in the cluster."""
    base = strip_option(argv, "--processes")
    addresses = ",".join(f"127.0.0.1:{p}" for p in free_ports(processes))
    return [
        [sys.executable, "-m", "telepipe.cli", *base, "--process-id", str(i), "--addresses", addresses,
         *(extra[i] if extra else [])]
        for i in range(processes)
    ]  # fmt: skip


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it (a graceful drain) if the supervisor dies, even by kill -9."""
    import ctypes

    PR_SET_PDEATHSIG = 1  # noqa: N806 (linux/prctl.h)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def supervise(argvs: list[list[str]]) -> int:
    """Run the children until they all end; stop all if one fails. Returns the exit code."""
    children = [subprocess.Popen(a, preexec_fn=_die_with_parent) for a in argvs]
    stopping = False

    def forward(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    while any(c.poll() is None for c in children):
        for i, c in enumerate(children):
            rc = c.poll()
            if rc is not None and rc != 0 and code == 0:
                code = rc
                if not stopping:
                    log.error("process %d exited with %d; stopping the others", i, rc)
                    stopping = True
                    for other in children:
                        if other.poll() is None:
                            other.terminate()
        time.sleep(0.2)
    for c in children:
        if c.returncode != 0 and code == 0:
            code = c.returncode
    return code


__all__ = ["child_argvs", "free_ports", "strip_option", "supervise"]
