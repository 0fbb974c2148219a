"""`megagen sample`'s model: a config, a checkpoint directory or an exported weights file → the spec's
model in eval mode on the CPU, built the way training builds it, with the weights checked against it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from megagen.config import Config, ConfigError, load_config

CONFIG_SUFFIXES = (".yaml", ".yml")


def _config_from_tree(tree: dict, overrides: list[str], where: str) -> Config:
    """A Config from a stored config mapping (checkpoint / weights header) plus command-line overrides."""
    import yaml

    stored_spec = str((tree.get("model") or {}).get("spec", ""))
    named = [o.split("=", 1)[1].strip() for o in overrides if o.split("=", 1)[0].strip() == "model.spec"]
    if ":" in stored_spec and stored_spec not in named:
        raise ConfigError(
            "model.spec",
            f"{where} names the dotted path {stored_spec!r}; megagen imports code only when you name it: "
            f"add model.spec={stored_spec} to the command",
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(tree), encoding="utf-8")
        return load_config(path, overrides)


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor], source: str, key: str) -> None:
    params = dict(model.named_parameters())
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ConfigError(
            key, f"{source}: weights do not fit the model: missing {missing}, unexpected {unexpected}"
        )
    with torch.no_grad():
        for name, p in params.items():
            t = tensors[name]
            if tuple(t.shape) != tuple(p.shape):
                raise ConfigError(
                    key, f"{source}: {name} is {tuple(t.shape)}, the model's is {tuple(p.shape)}"
                )
            p.copy_(t.to(p.dtype))


def _check_identity(meta: dict, cfg: Config, source: str, key: str) -> None:
    spec, preset = meta.get("spec"), meta.get("preset")
    if spec and preset and (spec, preset) != (cfg.model.spec, cfg.model.preset):
        raise ConfigError(
            key, f"{source} holds {spec}/{preset}, the config builds {cfg.model.spec}/{cfg.model.preset}"
        )


_Loaded = tuple[Config, "dict[str, torch.Tensor] | None", dict, str]
"""(config, weights or None for fresh ones, the weights' metadata, where they came from)."""


def _from_config(p: Path, overrides: list[str], weights: str | None) -> _Loaded:
    cfg = load_config(p, overrides)
    if weights:
        tensors, meta = _read_weights_file(weights)
        return cfg, tensors, meta, str(weights)
    return cfg, None, {}, f"fresh weights (run.seed={cfg.run.seed}) for {p}"


def _from_weights_file(p: Path, overrides: list[str], config: str | None, weights: str | None) -> _Loaded:
    if weights:
        raise ConfigError("--weights", "SOURCE is already a weights file")
    tensors, meta = _read_weights_file(p)
    if config:
        cfg = load_config(config, overrides)
    elif meta.get("config"):
        cfg = _config_from_tree(json.loads(meta["config"]), overrides, str(p))
    else:
        raise ConfigError("SOURCE", f"{p} carries no config in its header: pass --config CONFIG")
    return cfg, tensors, meta, str(p)


def _from_checkpoint(
    p: Path, overrides: list[str], config: str | None, weights: str | None, ema: bool
) -> _Loaded:
    if weights:
        raise ConfigError("--weights", "SOURCE is a checkpoint; --weights goes with a CONFIG")
    try:
        from megagen.checkpoint import load_checkpoint_weights
    except ImportError as exc:
        raise ConfigError("SOURCE", f"this megagen cannot read checkpoint directories ({exc})") from None
    tensors, meta = load_checkpoint_weights(p, ema=ema, key="SOURCE")
    if config:
        cfg = load_config(config, overrides)
    elif meta.get("config"):
        cfg = _config_from_tree(meta["config"], overrides, f"checkpoint {p}")
    else:
        raise ConfigError("SOURCE", f"{p}: the checkpoint records no config: pass --config CONFIG")
    return cfg, tensors, meta, f"{p} ({'EMA' if ema else 'model'} weights, step {meta.get('step', '?')})"


def load_model(
    source: str,
    overrides: list[str] = (),
    config: str | None = None,
    weights: str | None = None,
    ema: bool = False,
):
    """(cfg, spec, model in eval mode on CPU, description of where the weights came from)."""
    from megagen.specs import get_spec

    overrides = list(overrides)
    p = Path(source)
    if ema and not p.is_dir():
        raise ConfigError("--ema", "EMA weights come from a checkpoint directory")
    if p.suffix in CONFIG_SUFFIXES:
        cfg, tensors, meta, origin = _from_config(p, overrides, weights)
    elif p.suffix == ".safetensors":
        cfg, tensors, meta, origin = _from_weights_file(p, overrides, config, weights)
    elif p.is_dir():
        cfg, tensors, meta, origin = _from_checkpoint(p, overrides, config, weights, ema)
    elif not p.exists():
        raise ConfigError("SOURCE", f"{p} does not exist")
    else:
        raise ConfigError(
            "SOURCE", f"{p}: expected a CONFIG (.yaml), a checkpoint directory or a .safetensors file"
        )
    p_cfg = cfg.parallel  # sampling runs in one process, whatever mesh trained the model
    p_cfg.tp = p_cfg.cp = p_cfg.dp_replicate = p_cfg.dp_shard = 1
    spec = get_spec(cfg.model.spec)
    spec.validate(cfg)
    model = fresh_model(cfg, spec)
    if tensors is not None:
        _check_identity(meta, cfg, origin, "SOURCE")
        _assign(model, tensors, origin, "SOURCE")
    return cfg, spec, model.eval(), origin


def fresh_model(cfg: Config, spec) -> nn.Module:
    """The full model on the CPU with the weights a training run of `cfg` starts from (same build path,
    same values: `megagen/train/build.py`)."""
    from megagen.parallel.materialize import materialize
    from megagen.train.build import record_model

    model, record = record_model(cfg, spec)
    materialize(model, record.full_tensor, torch.device("cpu"))
    return model


def _read_weights_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not Path(path).is_file():
        raise ConfigError("--weights", f"file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - one line naming the file
        raise ConfigError("--weights", f"{path} is not a readable safetensors file: {exc}") from None
