"""Reading and writing a RunConfig (the schema is config.py): TOML files, `--section.key value`
command-line overrides, run presets, and the coercion of each value to its field's type.

Every key is checked: an unknown one is an error that names the closest valid key, a value of
the wrong type is an error that names the key and the value. Coercion only does the harmless
conversions (int -> float, an integral float -> int, a number -> str for a string key); "false"
is not a bool and 1.5 is not an int."""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from ..config import MODEL_PRESETS, ModelConfig
from .config import SECTIONS, RunConfig
from .presets import RUN_PRESETS


# ---------------------------------------------------------------------- setting values
def _hint(key: str, names, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.5)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def field_type(cfg: RunConfig, dotted: str) -> Any:
    """The annotation of `section.key` (ValueError for an unknown section or key)."""
    section, _, key = dotted.partition(".")
    if section not in SECTIONS:
        raise ValueError(f"unknown config section {section!r} in {dotted!r}"
                         f"{_hint(section, SECTIONS)}")
    if not key:
        raise ValueError(f"config key {dotted!r} needs the form section.key")
    if section == "model":
        hints = {"preset": str, **typing.get_type_hints(ModelConfig)}
        if key not in hints:
            raise ValueError(f"unknown config key model.{key}{_hint(key, hints, 'model.')}")
        return hints[key]
    _, typ = _walk(cfg, section, key)
    return typ


def _walk(cfg: RunConfig, section: str, key: str) -> tuple[Any, Any]:
    """(the dataclass holding `key`, the key's annotation); `key` may be dotted into a nested
    table (`train.lora.rank`)."""
    obj, where = getattr(cfg, section), section
    *tables, last = key.split(".")
    for name in tables + [last]:
        hints = typing.get_type_hints(type(obj))
        if name not in hints:
            raise ValueError(f"unknown config key {where}.{name}"
                             f"{_hint(name, list(hints), where + '.')}")
        if name == last:
            return obj, hints[name]
        if not dataclasses.is_dataclass(hints[name]):
            raise ValueError(f"config key {where}.{name} is not a table")
        obj, where = getattr(obj, name), f"{where}.{name}"


def set_value(cfg: RunConfig, dotted: str, value: Any) -> None:
    """Set `section.key` to `value` (already parsed), checking the key and the type."""
    typ = field_type(cfg, dotted)
    section, _, key = dotted.partition(".")
    if dotted == "model.preset":
        value = "" if value is None else coerce(dotted, value, str)
        from ..vision.config import VL_PRESETS  # VL runs: train/vl_train.py

        if value and value not in MODEL_PRESETS and value not in VL_PRESETS:
            raise ValueError(f"model.preset: unknown model preset {value!r}; available: "
                             f"{', '.join([*MODEL_PRESETS, *VL_PRESETS])}")
        cfg.model.preset = value
    elif section == "model":
        cfg.model.fields[key] = coerce(dotted, value, typ)
    elif dataclasses.is_dataclass(typ):  # a nested table: each of its keys
        if not isinstance(value, dict):
            raise ValueError(f"{dotted} must be a table, got {value!r}")
        for k, v in value.items():
            set_value(cfg, f"{dotted}.{k}", v)
    else:
        setattr(_walk(cfg, section, key)[0], key.rsplit(".", 1)[-1], coerce(dotted, value, typ))


def set_text(cfg: RunConfig, dotted: str, text: str) -> None:
    """Set `section.key` from command-line text: kept verbatim for string keys, else read as a
    TOML value (numbers, booleans, lists)."""
    typ = field_type(cfg, dotted)
    set_value(cfg, dotted, text if typ is str else parse_cli_value(text))


def update(cfg: RunConfig, data: dict[str, Any]) -> RunConfig:
    """Apply a TOML document's tables to `cfg`; returns it."""
    for section, values in data.items():
        if section not in SECTIONS:
            raise ValueError(f"unknown config section {section!r}{_hint(section, SECTIONS)}")
        if not isinstance(values, dict):
            raise ValueError(f"config section [{section}] must be a table, got {values!r}")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value)
    return cfg


def from_dict(data: dict[str, Any]) -> RunConfig:
    return update(RunConfig(), data)


def coerce(name: str, value: Any, typ: Any) -> Any:
    """Check `value` against a dataclass annotation, converting the harmless cases."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(name, value, arg)
            except ValueError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ValueError(f"{name} must be a list, got {value!r}")
        return [coerce(name, v, args[0]) if args else v for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a table, got {value!r}")
        return dict(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{name} must be a number, got {value!r}")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


# ---------------------------------------------------------------------- TOML
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot write {value!r} to TOML")


def to_toml(cfg: RunConfig) -> str:
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def load_toml(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    try:
        return from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# ---------------------------------------------------------------------- command line
def parse_cli_value(text: str) -> Any:
    """A command-line value as TOML would read it (numbers, booleans, lists), else the string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """`--section.key value` or `--section.key=value` pairs (value text), in order."""
    out = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ValueError(f"unexpected argument {arg!r}: overrides look like "
                             f"--section.key value (sections: {', '.join(SECTIONS)})")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ValueError(f"--{key} needs a value")
            value = args[i + 1]
            i += 1
        out.append((key, value))
        i += 1
    return out


def from_preset(name: str) -> RunConfig:
    """The run preset `name` (presets.py). A model preset's name is refused with a pointer to
    `--model.preset`: the two are different things."""
    if name not in RUN_PRESETS:
        if name in MODEL_PRESETS:
            raise ValueError(f"{name!r} is a model preset, not a run preset; train it with "
                             f"--model.preset {name} (run presets: {', '.join(RUN_PRESETS)})")
        raise ValueError(f"unknown run preset {name!r}{_hint(name, RUN_PRESETS)}; "
                         f"available: {', '.join(RUN_PRESETS)}")
    return from_dict(RUN_PRESETS[name])


def resolve(preset: str | None = None, config_file: str | None = None,
            overrides: list[tuple[str, str]] = ()) -> RunConfig:
    """Run preset or TOML file (defaults if neither), then the command-line overrides in order."""
    if preset and config_file:
        raise ValueError("give either --preset or --config, not both")
    cfg = load_toml(config_file) if config_file else from_preset(preset) if preset else RunConfig()
    for key, text in overrides:
        set_text(cfg, key, text)
    return cfg


