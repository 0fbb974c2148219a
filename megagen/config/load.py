"""YAML + dotted command-line overrides → a validated `Config`.

Values from YAML keep their YAML types; override values are strings parsed against the field's declared
type, so `parallel.tp=abc` fails with the key named instead of surfacing later as a crash.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from megagen.config.errors import ConfigError
from megagen.config.schema import Config

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _field_type(owner: Any, name: str) -> type:
    hints = typing.get_type_hints(type(owner))
    return hints[name]


def _coerce(key: str, value: Any, typ: type, words: tuple = ()) -> Any:
    """Convert `value` (YAML scalar or override string) to `typ`, or raise naming `key`. A field typed
    `int | str` (or `bool | str`) holds an integer (a boolean) or one of its `words` (e.g. `auto`)."""
    from_string = isinstance(value, str)
    if words:
        if from_string and value.strip().lower() in words:
            return value.strip().lower()
        base = next(t for t in typing.get_args(typ) if t is not str)
        try:
            return _coerce(key, value, base)
        except ConfigError:
            kind = "a boolean (true/false)" if base is bool else "an integer"
            raise ConfigError(key, f"expected {kind} or {' / '.join(words)}, got {value!r}") from None
    if typ is bool:
        if isinstance(value, bool):
            return value
        if from_string and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(key, f"expected a boolean (true/false), got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if from_string:
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_string:
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {value!r}")
    if typ is dict:
        if from_string:
            try:
                value = yaml.safe_load(value) if value.strip() else {}
            except yaml.YAMLError as exc:
                raise ConfigError(key, f"expected a mapping, could not parse {value!r}: {exc}") from exc
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return value
    if typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, f"expected a string, got {value!r}")
    raise ConfigError(key, f"unsupported field type {typ}")


def _set(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2:
        groups = ", ".join(f.name for f in dataclasses.fields(cfg))
        raise ConfigError(key, f"keys have the form group.name; groups are: {groups}")
    group_name, name = parts
    group = getattr(cfg, group_name, None)
    if group is None or not dataclasses.is_dataclass(group):
        groups = ", ".join(f.name for f in dataclasses.fields(cfg))
        raise ConfigError(key, f"unknown group {group_name!r}; groups are: {groups}")
    names = [f.name for f in dataclasses.fields(group)]
    if name not in names:
        raise ConfigError(key, f"unknown key; {group_name} has: {', '.join(names)}")
    meta = next(f.metadata for f in dataclasses.fields(group) if f.name == name)
    setattr(group, name, _coerce(key, value, _field_type(group, name), meta.get("words", ())))


def _flatten(tree: Any) -> dict[str, Any]:
    """{group: {key: value}} → {"group.key": value}; values may themselves be mappings."""
    if not isinstance(tree, dict):
        raise ConfigError("<root>", f"expected a mapping of groups, got {type(tree).__name__}")
    flat: dict[str, Any] = {}
    for group, keys in tree.items():
        if not isinstance(keys, dict):
            raise ConfigError(str(group), f"expected a mapping of keys, got {keys!r}")
        for k, v in keys.items():
            flat[f"{group}.{k}"] = v
    return flat


def parse_override(text: str) -> tuple[str, str]:
    """`key.sub=value` → (key, value)."""
    if "=" not in text:
        raise ConfigError(text, "overrides have the form key.sub=value")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _read_yaml(p: Path) -> Any:
    """The YAML tree of config file `p`, or a ConfigError naming the file (and the line of a syntax error)."""
    if p.is_dir():
        raise ConfigError("<config>", f"{p} is a directory; expected a YAML file")
    if not p.is_file():
        raise ConfigError("<config>", f"file not found: {p}")
    try:
        with open(p, encoding="utf-8") as fh:
            return yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError("<config>", f"{p}:{where}: not valid YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("<config>", f"cannot read {p}: {exc}") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults ← YAML file ← overrides, then validated. Raises ConfigError naming the bad key."""
    cfg = Config()
    if path is not None:
        tree = _read_yaml(Path(path))
        for key, value in _flatten(tree).items():
            _set(cfg, key, value)
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value)
    validate(cfg)
    return cfg


def _check_bucket_tables(cfg: Config) -> None:
    for bucket, sizes in cfg.data.bucket_batch.items():
        key = f"data.bucket_batch.{bucket}"
        if not isinstance(sizes, dict) or set(sizes) - {"global", "micro"}:
            raise ConfigError(key, f"expected {{global: G, micro: M}}, got {sizes!r}")
        for name, value in sizes.items():
            if name == "micro" and value == "auto":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{key}.{name}", f"expected a positive integer, got {value!r}")
    for bucket, weight in cfg.data.bucket_weights.items():
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 <= weight < math.inf:
            key = f"data.bucket_weights.{bucket}"
            raise ConfigError(key, f"expected a finite weight >= 0, got {weight!r}")
    try:
        values = [float(v) for v in cfg.eval.t_values.split(",")]
    except ValueError as exc:
        raise ConfigError(
            "eval.t_values", f"expected comma-separated numbers, got {cfg.eval.t_values!r}"
        ) from exc
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise ConfigError("eval.t_values", f"values must lie in [0, 1], got {cfg.eval.t_values!r}")


_BOUNDS = (
    ("min", ">=", lambda v, b: v >= b),
    ("above", ">", lambda v, b: v > b),
    ("max", "<=", lambda v, b: v <= b),
    ("below", "<", lambda v, b: v < b),
)
"""Bound kinds of `opt(...)` metadata: (key, how the message says it, the test a valid value passes)."""


def check_field(key: str, value: Any, meta: dict) -> None:
    """One field against its `opt` metadata: choices, finiteness (floats), bounds. ConfigError naming `key`.

    Bounds are written as tests a valid value passes, so NaN (which fails every comparison) cannot slip by.
    """
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(key, f"got {value!r}; allowed: {', '.join(map(str, choices))}")
    if isinstance(value, str) and value in meta.get("words", ()):
        return  # e.g. `auto`: a word the field allows besides numbers
    if isinstance(value, float) and meta.get("finite", True) and not math.isfinite(value):
        raise ConfigError(key, f"got {value!r}; must be a finite number")
    for name, says, ok in _BOUNDS:
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            raise ConfigError(key, f"got {value!r}; must be {says} {bound}")


def profile_step_range(text: str) -> tuple[int, int] | None:
    """`metrics.profile_steps` "a,b" (or "a") → (a, b) with 1 <= a <= b; None when empty."""
    text = text.strip()
    if not text:
        return None
    first, _, last = text.partition(",")
    try:
        a, b = int(first), int(last or first)
    except ValueError:
        raise ConfigError("metrics.profile_steps", f"expected `a,b` (step numbers), got {text!r}") from None
    if not 1 <= a <= b:
        raise ConfigError("metrics.profile_steps", f"expected 1 <= a <= b, got {text!r}")
    return a, b


def _check_run_fields(cfg: Config) -> None:
    """Values that are strings to the schema but have a grammar of their own."""
    if not cfg.run.dir.strip():
        raise ConfigError("run.dir", "is empty; give the run's directory (e.g. runs/my-run)")
    profile_step_range(cfg.metrics.profile_steps)


def validate(cfg: Config) -> None:
    """Field-level checks (choices, finiteness, bounds) and cross-field checks that need no model."""
    for group in dataclasses.fields(cfg):
        sub = getattr(cfg, group.name)
        for f in dataclasses.fields(sub):
            check_field(f"{group.name}.{f.name}", getattr(sub, f.name), f.metadata)
    if cfg.parallel.dp_shard == 0:
        raise ConfigError("parallel.dp_shard", "got 0; use a positive size or -1 for the rest of the world")
    if -1.0 < cfg.train.step_timeout_s < 0.0:
        raise ConfigError(
            "train.step_timeout_s", f"got {cfg.train.step_timeout_s}; use seconds > 0, -1 = auto or 0 = off"
        )
    micro = cfg.train.micro_batch_size
    if isinstance(micro, int) and cfg.train.global_batch_size % micro:
        raise ConfigError(
            "train.micro_batch_size",
            f"{cfg.train.micro_batch_size} does not divide "
            f"train.global_batch_size={cfg.train.global_batch_size}",
        )
    if not cfg.data.synthetic and not cfg.data.path:
        raise ConfigError("data.path", "required when data.synthetic=false")
    _check_bucket_tables(cfg)
    _check_run_fields(cfg)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (what actually ran, overrides applied)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False)


def config_fingerprint(cfg: Config) -> str:
    return json.dumps(config_to_dict(cfg), sort_keys=True)


def describe_keys() -> str:
    """Every key group and key with its default and help, for `megagen train --help`."""
    lines = []
    cfg = Config()
    for group in dataclasses.fields(cfg):
        sub = getattr(cfg, group.name)
        doc = (type(sub).__doc__ or "").strip().splitlines()[0]
        lines.append(f"  {group.name}: {doc}")
        for f in dataclasses.fields(sub):
            choices = f.metadata.get("choices")
            extra = f" {{{'|'.join(map(str, choices))}}}" if choices else ""
            lines.append(
                f"    {group.name}.{f.name}={getattr(sub, f.name)!r}{extra}  {f.metadata.get('help', '')}"
            )
    return "\n".join(lines)
