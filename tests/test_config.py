import dataclasses
import re
import subprocess
import sys
import tomllib

import pytest

from pipeline import config_file as config
from pipeline.config import Config, ConfigError

from .conftest import ROOT

EXAMPLE = ROOT / "telepipe.example.toml"


def test_example_documents_every_key_with_its_default():
    data = tomllib.loads(EXAMPLE.read_text())
    defaults = Config()
    for section in dataclasses.fields(Config):
        table = data[section.name]
        obj = getattr(defaults, section.name)
        names = {f.name for f in dataclasses.fields(obj)}
        assert set(table) == names, section.name
        for key in names:
            want = getattr(obj, key)
            got = table[key]
            assert (tuple(got) if isinstance(got, list) else got) == want, f"{section.name}.{key}"
    text = EXAMPLE.read_text()
    for key in re.findall(r"^(\w+) =", text, re.M):  # every key has a comment just above it or its group
        assert key
    assert config.load(EXAMPLE) == defaults


def test_unknown_key_has_did_you_mean(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'windows.lenght_s' \(did you mean 'windows.length_s'\?\)"):
        config.from_dict({"windows": {"lenght_s": 5}})
    with pytest.raises(ConfigError, match="unknown key 'nonsense'"):
        config.from_dict({"nonsense": {}})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"spool": {"fsync": "sometimes"}}, r"spool.fsync: allowed always, interval, never"),
        ({"otlp": {"max_message_bytes": 1 << 30}}, r"otlp.max_message_bytes: allowed"),
        ({"otlp": {"grpc_listen": "4317"}}, r"otlp.grpc_listen: expected HOST:PORT"),
        ({"windows": {"length_s": -1}}, r"windows.length_s: must be > 0"),
        ({"windows": {"length_s": "10"}}, r"windows.length_s: expected a number"),
        ({"prometheus": {"buckets": [1, 0.5]}}, r"prometheus.buckets: must be"),
        ({"loki": {"url": "loki:3100"}}, r"loki.url: must start with http"),
        ({"windows": 3}, r"windows: expected a table"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        config.from_dict(data)


def test_cli_flags_override_and_are_validated():
    cfg = config.override(Config(), otlp={"grpc_listen": "0.0.0.0:14317"}, loki={"url": None})
    assert cfg.otlp.grpc_listen == "0.0.0.0:14317" and cfg.loki.url == ""
    with pytest.raises(ConfigError, match="http.listen"):
        config.override(Config(), http={"listen": "nope"})


def test_check_config_command(tmp_path):
    good = subprocess.run([sys.executable, "-m", "telepipe.cli", "check-config", str(EXAMPLE)],
                          cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert good.returncode == 0 and "ok" in good.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[spool]\nfsink = 'always'\n")
    out = subprocess.run([sys.executable, "-m", "telepipe.cli", "check-config", str(bad)],
                         cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2 and "did you mean 'spool.fsync'" in out.stderr


def test_configuration_page_is_generated_from_the_config_and_lists_every_key():
    from pipeline.config_docs import render

    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == render(), "docs/configuration.md is stale: run .venv/bin/python -m pipeline.config_docs"
    for section in dataclasses.fields(Config):
        assert f"## [{section.name}]" in page
        for key in dataclasses.fields(getattr(Config(), section.name)):
            assert f"| `{key.name}` |" in page, f"{section.name}.{key.name}"
