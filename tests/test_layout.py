"""The layout the architecture docs describe: imports run one way between the top-level
packages, the plain state classes load neither the engine nor a sink, no module is over
500 lines."""

import ast
import subprocess
import sys

import pytest

from .conftest import ROOT

PACKAGES = ("pipeline", "sources", "sinks", "telepipe")
# What each top-level package may import of the others (records, config and decoding at the
# bottom in pipeline; sources and sinks above it; the program on top).
ALLOWED = {
    "pipeline": {"pipeline"},
    "sources": {"pipeline", "sources"},
    "sinks": {"pipeline", "sinks"},
    "telepipe": {"pipeline", "sources", "sinks", "telepipe"},
}
GENERATED = {"externalscaler_pb2.py", "externalscaler_pb2_grpc.py"}
# Plain state and records: importing one loads neither bytewax nor any sink or source.
PLAIN = (
    "pipeline.model", "pipeline.config", "pipeline.batch_codec", "pipeline.decode", "pipeline.preaggregate",
    "pipeline.windows", "pipeline.window_ops", "pipeline.sketch", "pipeline.detectors", "pipeline.anomaly",
    "pipeline.scaling", "pipeline.servicegraph", "pipeline.span_index", "pipeline.service",
)  # fmt: skip


def modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield package, path


def imported_packages(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_imports_run_one_way_between_top_level_packages():
    wrong = []
    for package, path in modules():
        for top in imported_packages(path):
            if top in PACKAGES and top not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)} imports {top}")
    assert wrong == []


@pytest.mark.parametrize("module", PLAIN)
def test_plain_state_loads_no_engine_and_no_sink(module):
    code = (
        f"import sys, {module}; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('bytewax', 'sinks', 'sources', 'telepipe')); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} loads {out.stdout.strip()}"


def test_no_module_over_500_lines():
    long = []
    for root in (*PACKAGES, "bench", "tests"):
        for path in (ROOT / root).rglob("*.py"):
            lines = path.read_text().count("\n")
            if lines > 500 and path.name not in GENERATED:
                long.append(f"{path.relative_to(ROOT)}: {lines}")
    assert long == []
