"""`megagen sample CKPT|CONFIG --prompt-embeddings FILE --steps N --cfg S --out DIR`: generate latents.

CKPT|CONFIG (the source) is one of
  CONFIG.yaml         the config's spec and preset with freshly initialised weights (seeded by run.seed);
                      for smoke tests, or with --weights FILE.safetensors for trained weights
  CKPT (directory)    a megagen checkpoint (or a checkpoint directory holding `latest`); its config comes
                      from the checkpoint, its weights (or the EMA weights, --ema) are loaded
  WEIGHTS.safetensors an exported weights file (`megagen ckpt export`); its config comes from the file's
                      header, or from --config

Dotted `key=value` overrides apply on top of the config (e.g. `data.latent_frames=8` for a longer sample).
A dotted-path spec (`model.spec=pkg.module:NAME`) found inside a checkpoint or weights file is not imported
unless the same value is given again on the command line: megagen imports code only when the user names it.

The prompt-embeddings FILE (`.safetensors`, `.npz`, or a `.npy` holding a dict, read without executing
pickled code) maps names to arrays: `text.<encoder>` (B, L, width) for every text encoder of the spec
(`megagen specs`; see the spec's `sample_shapes`), optionally `text_valid.<encoder>` (B, L) key masks, and
whatever other condition the spec needs (the upsampler's `lowres_latents`, the audio spec's
`video_features` / `context_mask`). Without the leading batch dimension the file holds one prompt. A
`latents` array, when present, is passed as given (the audio spec reads it as the known context) and sets
the output shape; otherwise the shape is `--latent-shape` or the spec's shape for the config's data keys.

The spec's sampler runs (default: Euler over Movie Gen's linear-quadratic schedule with classifier-free
guidance; windowed MultiDiffusion for the specs that define it), and DIR receives `latents.npy` and
`latents.safetensors` (B, C, ...) float32, and `sample.json` describing the run. The decoder is upstream.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from megagen.config import Config, ConfigError, load_config

log = logging.getLogger("megagen")

CONFIG_SUFFIXES = (".yaml", ".yml")


# ---------------------------------------------------------------------------------------------- inputs
class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dtypes, scalars and builtin containers; refuses every other global."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_npy_dict(path: Path) -> dict[str, np.ndarray]:
    """A `.npy` file written by `np.save(path, {name: array})`, read without running arbitrary pickles."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        if dtype != np.dtype(object) or shape != ():
            raise ConfigError(
                "--prompt-embeddings", f"{path} holds one {dtype} array; expected a dict of arrays"
            )
        obj = _NumpyOnlyUnpickler(io.BytesIO(fh.read())).load()
    value = obj.item() if isinstance(obj, np.ndarray) else obj
    if not isinstance(value, dict):
        raise ConfigError("--prompt-embeddings", f"{path} holds a {type(value).__name__}, expected a dict")
    return value


def read_prompt_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """{name: tensor} from a `.safetensors`, `.npz` or dict-`.npy` file (floats as float32)."""
    p = Path(path)
    key = "--prompt-embeddings"
    if not p.is_file():
        raise ConfigError(key, f"file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: dict[str, Any] = load_file(str(p))
        elif p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as npz:
                raw = {k: npz[k] for k in npz.files}
        elif p.suffix == ".npy":
            raw = _read_npy_dict(p)
        else:
            raise ConfigError(key, f"{p}: unsupported file type (use .safetensors, .npz or a dict .npy)")
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file ends in one line naming it
        raise ConfigError(key, f"{p} is not readable: {type(exc).__name__}: {exc}") from None
    out = {}
    for name, value in raw.items():
        t = torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
        out[str(name)] = t.float() if t.is_floating_point() else t
    if not out:
        raise ConfigError(key, f"{p} holds no arrays")
    return out


def make_batch(
    spec, cfg: Config, arrays: dict[str, torch.Tensor], latent_shape: tuple[int, ...] | None = None
) -> dict[str, torch.Tensor]:
    """The sampler's batch: the file's arrays (with a batch dim) plus `latents` (zeros unless given)."""
    key = "--prompt-embeddings"
    shapes = spec.sample_shapes(cfg)
    required = [k for k in shapes if k != "latents"]
    missing = [k for k in required if k not in arrays]
    if missing:
        raise ConfigError(
            key,
            f"missing {missing} for spec {spec.name!r} (it needs {required}); the file has {sorted(arrays)}",
        )

    def per_sample_ndim(name: str) -> int | None:
        if name in shapes:
            return len(shapes[name])
        if name.startswith("text_valid.") and f"text.{name.split('.', 1)[1]}" in shapes:
            return 1
        return None

    unbatched = {
        n for n, t in arrays.items() if per_sample_ndim(n) is not None and t.dim() == per_sample_ndim(n)
    }
    known = {n for n in arrays if per_sample_ndim(n) is not None}
    if unbatched and unbatched != known:
        raise ConfigError(
            key, f"{sorted(unbatched)} lack the batch dimension that {sorted(known - unbatched)} have"
        )
    single = bool(unbatched)
    batch = {n: (t.unsqueeze(0) if single else t) for n, t in arrays.items()}
    for name in known:
        want = shapes.get(name)
        got = tuple(batch[name].shape[1:])
        if want is not None and (len(got) != len(want) or got[-1] != want[-1]):
            raise ConfigError(key, f"{name} has per-sample shape {got}; spec {spec.name!r} expects {want}")
    sizes = {n: t.shape[0] for n, t in batch.items() if t.dim() > 0}
    if len(set(sizes.values())) > 1:
        raise ConfigError(key, f"arrays disagree on the batch size: {sizes}")
    b = next(iter(sizes.values()))
    if any(n.startswith("text_valid.") for n in batch):  # masks for some encoders: all-true for the rest
        for name in [n for n in shapes if n.startswith("text.")]:
            valid = "text_valid." + name.split(".", 1)[1]
            batch[valid] = (
                batch[valid].bool() if valid in batch else torch.ones(batch[name].shape[:2], dtype=bool)
            )
    if "latents" not in batch:
        shape = tuple(latent_shape) if latent_shape else tuple(shapes["latents"])
        batch["latents"] = torch.zeros((b, *shape))
    elif latent_shape and tuple(batch["latents"].shape[1:]) != tuple(latent_shape):
        raise ConfigError("--latent-shape", f"{tuple(latent_shape)} disagrees with the file's latents")
    return batch


# ---------------------------------------------------------------------------------------------- model
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
    tensors: dict[str, torch.Tensor] | None = None
    meta: dict = {}
    if p.suffix in CONFIG_SUFFIXES:
        cfg = load_config(p, overrides)
        origin = f"fresh weights (run.seed={cfg.run.seed}) for {p}"
        if weights:
            tensors, meta = _read_weights_file(weights)
            origin = str(weights)
    elif p.suffix == ".safetensors":
        if weights:
            raise ConfigError("--weights", "SOURCE is already a weights file")
        tensors, meta = _read_weights_file(p)
        if config:
            cfg = load_config(config, overrides)
        elif meta.get("config"):
            cfg = _config_from_tree(json.loads(meta["config"]), overrides, str(p))
        else:
            raise ConfigError("SOURCE", f"{p} carries no config in its header: pass --config CONFIG")
        origin = str(p)
    elif p.is_dir():
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
        origin = f"{p} ({'EMA' if ema else 'model'} weights, step {meta.get('step', '?')})"
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


# ---------------------------------------------------------------------------------------------- run
def sample_latents(
    source: str,
    prompt_file: str,
    out: str,
    steps: int = 50,
    cfg_scale: float = 1.0,
    seed: int = 0,
    overrides: list[str] = (),
    config: str | None = None,
    weights: str | None = None,
    ema: bool = False,
    latent_shape: tuple[int, ...] | None = None,
    device: str = "cpu",
    overwrite: bool = False,
) -> dict:
    """Load, sample, write; returns the `sample.json` record."""
    out_dir = Path(out)
    targets = [out_dir / "latents.npy", out_dir / "latents.safetensors", out_dir / "sample.json"]
    if not overwrite and any(t.exists() for t in targets):
        raise ConfigError("--out", f"{out_dir} already holds samples; pass --overwrite to replace them")
    cfg, spec, model, origin = load_model(source, overrides, config, weights, ema)
    batch = make_batch(spec, cfg, read_prompt_file(prompt_file), latent_shape)
    dev = torch.device(device)
    model.to(dev)
    batch = {k: v.to(dev) for k, v in batch.items()}
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        latents = spec.sample(model, cfg, batch, steps=steps, cfg_scale=cfg_scale, generator=generator)
    seconds = time.perf_counter() - start
    array = latents.detach().float().cpu().contiguous()
    record = {
        "spec": cfg.model.spec,
        "preset": cfg.model.preset,
        "weights": origin,
        "prompt_embeddings": str(prompt_file),
        "steps": steps,
        "cfg_scale": cfg_scale,
        "seed": seed,
        "shape": list(array.shape),
        "seconds": round(seconds, 3),
        "files": ["latents.npy", "latents.safetensors"],
    }
    _write(out_dir, array, record)
    return record


def _write(out_dir: Path, latents: torch.Tensor, record: dict) -> None:
    """Each file is written to a temporary name and renamed into place."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {k: str(v) for k, v in record.items() if k != "files"}
    writers = {
        "latents.npy": lambda f: np.save(f, latents.numpy()),
        "latents.safetensors": lambda f: save_file({"latents": latents}, f, metadata=meta),
    }
    for name, write in writers.items():
        tmp = out_dir / f".{name}.tmp-{os.getpid()}"
        try:
            if name.endswith(".npy"):
                with open(tmp, "wb") as fh:
                    write(fh)
            else:
                write(str(tmp))
            os.replace(tmp, out_dir / name)
        finally:
            tmp.unlink(missing_ok=True)
    tmp = out_dir / f".sample.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / "sample.json")


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated shape such as 16,4,8,8")
    return shape


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return v


def add_sample_command(subparsers) -> argparse.ArgumentParser:
    """Register `sample` on the top-level argparse subparsers; returns its parser."""
    p = subparsers.add_parser(
        "sample",
        help="generate latents from prompt embeddings with a spec's sampler",
        description=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "source", metavar="CKPT|CONFIG", help="checkpoint dir, exported .safetensors, or YAML config"
    )
    p.add_argument(
        "overrides", metavar="OVERRIDE", nargs="*", help="dotted overrides, e.g. data.latent_frames=8"
    )
    p.add_argument(
        "--prompt-embeddings", required=True, metavar="FILE", help=".safetensors / .npz / dict .npy"
    )
    p.add_argument("--steps", type=_positive_int, default=50, help="sampler steps (default 50)")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (default 1: off)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--latent-shape", type=_shape, metavar="C,T,H,W", help="output latent shape per sample")
    p.add_argument("--config", metavar="CONFIG", help="config for a checkpoint / weights file (else its own)")
    p.add_argument("--weights", metavar="FILE", help="with a CONFIG: load these .safetensors weights")
    p.add_argument("--ema", action="store_true", help="with a checkpoint: use its EMA weights")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace samples already in DIR")
    return p


def run_sample_command(args) -> int:
    """Run a parsed `megagen sample`; ConfigError propagates (the CLI prints it and exits 2)."""
    try:
        record = sample_latents(
            args.source,
            args.prompt_embeddings,
            args.out,
            steps=args.steps,
            cfg_scale=args.cfg,
            seed=args.seed,
            overrides=args.overrides,
            config=args.config,
            weights=args.weights,
            ema=args.ema,
            latent_shape=args.latent_shape,
            device=args.device,
            overwrite=args.overwrite,
        )
    except ConfigError:
        raise
    except OSError as exc:
        print(f"megagen sample: {exc}", file=sys.stderr)
        return 1
    what = f"{record['spec']}/{record['preset']}, {record['steps']} steps, cfg {record['cfg_scale']}"
    files = f"{args.out}/latents.npy and latents.safetensors {tuple(record['shape'])}"
    print(f"megagen sample: {what} → {files} in {record['seconds']} s")
    return 0
