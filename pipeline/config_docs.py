"""``docs/configuration.md``, generated from the configuration classes.

    .venv/bin/python -m pipeline.config_docs > docs/configuration.md

Every key of every section: its type and default from ``pipeline/config.py``, what it
does from the comment above it in ``telepipe.example.toml``, and the values allowed as
the validation itself states them (each key is tried with out-of-range values and the
``ConfigError`` message is quoted), so the page cannot drift from what is enforced.
``tests/test_config.py`` fails when the committed page differs from what this writes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, get_type_hints

from pipeline.config import Config, ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "telepipe.example.toml"
_PROBES: dict[Any, tuple] = {
    int: (-1, 0, 10**15),
    float: (-1.0, 0.0, 1e15),
    str: ("\x00not-a-value",),
}


def example_comments(text: str) -> dict[str, str]:
    """"section.key" -> the comment block above it (a block above several keys is theirs)."""
    out: dict[str, str] = {}
    section, block_done = "", False
    block: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("[") and not line.startswith("[["):
            section, block, block_done = line.strip("[]"), [], False
        elif line.startswith("#"):
            if block_done:
                block, block_done = [], False
            block.append(line.lstrip("#").strip())
        elif "=" in line and section:
            key = line.split("=", 1)[0].strip()
            out[f"{section}.{key}"] = " ".join(b for b in block if b)
            block_done = True
    return out


def _type_name(tp: Any) -> str:
    if tp in (int, float, str, bool):
        return tp.__name__
    item = getattr(tp, "__args__", (None,))[0]
    if dataclasses.is_dataclass(item):
        return f"list of [[tables]] ({', '.join(f.name for f in dataclasses.fields(item))})"
    return "list of strings" if item is str else "list of numbers"


def _allowed(cls: type, name: str, tp: Any) -> str:
    """What the section's validation says about ``name``, from the errors of out-of-range values."""
    if tp is bool:
        return "true, false"
    said: list[str] = []
    for value in _PROBES.get(tp, ()):
        try:
            cls(**{name: value})
        except ConfigError as exc:
            message = re.sub(r"[;,] got .*$", "", str(exc)).strip()
            message = message.split(": ", 1)[1] if message.split(": ", 1)[0].endswith(name) else message
            if message not in said:
                said.append(message)
        except (TypeError, ValueError):
            continue
    return "; ".join(said) or "any"


def _default(value: Any) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, tuple):
        return "[" + ", ".join(map(_default, value)) + "]" if value else "[]"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render() -> str:
    comments = example_comments(EXAMPLE.read_text())
    out = [
        "# Configuration",
        "",
        "One TOML file (`telepipe run --config FILE`; `telepipe check-config FILE` validates it). Every key,",
        "its type, default, the values allowed and what it does. Generated from `pipeline/config.py` and the",
        "comments of [`telepipe.example.toml`](../telepipe.example.toml) by `python -m pipeline.config_docs`;",
        "do not edit by hand. Unknown keys and values outside what is allowed are errors naming the key.",
        "What may change across a restart: [operations](operations.md).",
        "",
    ]
    for section in dataclasses.fields(Config):
        cls = get_type_hints(Config)[section.name]
        out += [f"## [{section.name}]", "", "| key | type | default | allowed | what it does |"]
        out.append("|---|---|---|---|---|")
        hints = get_type_hints(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            what = comments.get(f"{section.name}.{f.name}", "").replace("|", "\\|")
            allowed = _allowed(cls, f.name, tp).replace("|", "\\|")
            row = (f"`{f.name}`", _type_name(tp), f"`{_default(getattr(defaults, f.name))}`", allowed, what)
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
