"""A diffusers `save_pretrained` directory as a `checkpoint.init_from` source, read slice by slice.

    DIR/config.json                                          the model's config (+ _class_name, ...)
    DIR/diffusion_pytorch_model.safetensors                  one file, or shards named by
    DIR/diffusion_pytorch_model.safetensors.index.json       {"weight_map": {tensor: shard file}}

Only JSON and safetensors are read (no pickle). Opening checks what can be checked cheaply on every rank:
the config against the run's preset (field by field), every shard's header, and that each tensor the
spec's table needs is there with the preset's shape. Loading then reads, per megagen parameter, only the
rows this rank holds (`RuleReader` over safetensors `get_slice`).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import ExitStack
from pathlib import Path

import torch

from megagen.checkpoint.external_format import RuleReader, config_mismatches, table_for
from megagen.checkpoint.layout import CheckpointError

FORMAT = "diffusers"
CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"


def is_diffusers_dir(path: Path) -> bool:
    weights = (path / WEIGHTS).exists() or (path / INDEX).exists()
    return path.is_dir() and (path / CONFIG).is_file() and weights


def read_json(path: Path, key: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(key, f"{path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(key, f"{path} holds {type(data).__name__}, not a JSON object")
    return data


def weight_files(directory: Path, key: str) -> dict[str, Path] | None:
    """Tensor name → shard file from the index (None for a single-file directory)."""
    if not (directory / INDEX).exists():
        return None
    index = read_json(directory / INDEX, key)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(key, f"{directory / INDEX} has no weight_map")
    out = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or "/" in file or "\\" in file or file.startswith("."):
            raise CheckpointError(key, f"{directory / INDEX} names a shard outside the directory: {file!r}")
        out[name] = directory / file
    return out


def _open(stack: ExitStack, file: Path, key: str):
    from safetensors import safe_open

    if not file.is_file():
        raise CheckpointError(key, f"shard {file} is missing")
    try:
        return stack.enter_context(safe_open(str(file), framework="pt"))
    except Exception as exc:  # noqa: BLE001 - any parse failure: a clear error naming the file
        raise CheckpointError(key, f"{file} is not a readable safetensors file: {exc}") from None


def open_tensors(stack: ExitStack, directory: Path, key: str) -> dict[str, tuple[Path, object]]:
    """Tensor name → (file, open safetensors handle), each shard opened once inside `stack`."""
    files = weight_files(directory, key)
    if files is None:
        handle = _open(stack, directory / WEIGHTS, key)
        return {name: (directory / WEIGHTS, handle) for name in handle.keys()}
    handles = {file: _open(stack, file, key) for file in sorted(set(files.values()))}
    out = {}
    for name, file in files.items():
        if name not in handles[file].keys():
            raise CheckpointError(key, f"{file} lacks {name!r}, which {directory / INDEX} places there")
        out[name] = (file, handles[file])
    return out


class DiffusersSource:
    """A diffusers directory seen as megagen tensors of the run's spec and preset."""

    def __init__(self, directory: Path, spec, arch, preset: str, key: str):
        self.path, self.key = directory, key
        label = f"{spec.name}/{preset}"
        table = table_for(spec.name, FORMAT, key)
        config = read_json(directory / CONFIG, key)
        bad = config_mismatches(config, table.outside_config(arch), FORMAT, label)
        if bad:
            raise CheckpointError(key, f"{directory} does not hold {label}: {'; '.join(bad)}")
        self.rules = table.tensor_rules(arch)
        self.meta = {"spec": spec.name, "preset": preset, "format": FORMAT}
        with ExitStack() as stack:
            tensors = open_tensors(stack, directory, key)
            self._check_tensors(tensors)
        self.shapes = {name: rule.target_shape() for name, rule in self.rules.items()}
        used = {s for rule in self.rules.values() for s in rule.sources}
        self.unused = sorted(set(tensors) - used)

    def _check_tensors(self, tensors: dict) -> None:
        for target, rule in self.rules.items():
            for name, shape in zip(rule.sources, rule.shapes):
                if name not in tensors:
                    raise CheckpointError(self.key, f"{self.path} lacks {name!r} (for megagen {target})")
                file, handle = tensors[name]
                have = tuple(handle.get_slice(name).get_shape())
                if have != tuple(shape):
                    raise CheckpointError(
                        self.key, f"{file}: {name} is {have}, preset expects {tuple(shape)} (for {target})"
                    )

    def load(self, targets: dict[str, torch.Tensor]) -> None:
        """Fill `targets` (megagen name → tensor/DTensor): each rank reads only the rows it holds."""
        from megagen.parallel.materialize import local_part, read_local

        with ExitStack() as stack, torch.no_grad():
            tensors = open_tensors(stack, self.path, self.key)
            for name, target in targets.items():
                rule = self.rules[name]
                reader = RuleReader(rule, [tensors[s][1].get_slice(s) for s in rule.sources])
                local_part(target).copy_(read_local(reader, self.shapes[name], target))


def open_diffusers(directory: Path, cfg, key: str) -> DiffusersSource:
    """The source for the run `cfg` builds (its spec's table, its preset's architecture)."""
    if cfg is None:
        raise CheckpointError(key, f"{directory} is a diffusers directory: reading it needs the run's config")
    from megagen.specs.registry import get_spec

    spec = get_spec(cfg.model.spec)
    return DiffusersSource(directory, spec, spec.arch(cfg), cfg.model.preset, key)


def diffusers_version() -> str:
    """The installed diffusers' version for config.json (diffusers warns, never fails, on another one)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:
        return "0.33.0"  # the first release with WanTransformer3DModel


def write_diffusers_dir(tensors: dict[str, torch.Tensor], config: dict, out: str | Path) -> Path:
    """config.json + one safetensors file, written in a temporary directory renamed into place."""
    from safetensors.torch import save_file

    from megagen.config.errors import UsageError

    out = Path(out)
    if out.exists():
        raise UsageError("OUT", f"{out} exists; refusing to overwrite it (remove it or choose another)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir()
        full = {**config, "_diffusers_version": diffusers_version()}
        (tmp / CONFIG).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS), {"format": "pt"})
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
