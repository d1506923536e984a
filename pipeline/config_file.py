"""One TOML file -> ``pipeline.config.Config``: unknown keys and bad values are errors naming
the key (with a "did you mean" hint for misspelt keys); CLI flags override keys the same way."""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from pathlib import Path
from typing import Any, get_type_hints

from pipeline.config import Config, ConfigError


def _coerce(key: str, tp: Any, value: Any) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp == tuple[float, ...]:
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{key}: expected a list of numbers, got {value!r}")
        return tuple(float(v) for v in value)
    if tp == tuple[str, ...]:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return tuple(value)
    item = getattr(tp, "__args__", (None,))[0]
    if isinstance(item, type) and dataclasses.is_dataclass(item):
        if not isinstance(value, list | tuple) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(f"{key}: expected a list of tables [[{key}]]")
        return tuple(_build(item, v, f"{key}.") for v in value)
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            hint = difflib.get_close_matches(key, names, n=1)
            allowed = ", ".join(names)
            msg = f"unknown key {full!r}"
            msg += f" (did you mean {prefix + hint[0]!r}?)" if hint else f"; allowed: {allowed}"
            raise ConfigError(msg)
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a table [{full}]")
            kwargs[key] = _build(tp, value, f"{full}.")
        else:
            kwargs[key] = _coerce(full, tp, value)
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "")


def load(path: str | Path | None) -> Config:
    """Read a TOML file (or the embedded defaults when ``path`` is None)."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    return from_dict(data)


def override(cfg: Config, **sections: dict[str, Any]) -> Config:
    """Return ``cfg`` with some keys replaced, validated like the file (CLI flags)."""
    replaced = {}
    for section, values in sections.items():
        values = {k: v for k, v in values.items() if v is not None}
        if values:
            current = dataclasses.asdict(getattr(cfg, section))
            current.update(values)
            replaced[section] = _build(type(getattr(cfg, section)), current, f"{section}.")
    return dataclasses.replace(cfg, **replaced)
