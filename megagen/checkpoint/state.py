"""What a checkpoint holds, and how it goes into and out of a `Trainer`.

Tensors (DCP, sharded, reshardable; keys are the model's fully qualified parameter names, identical on
every mesh — tensor parallelism, FSDP2, recompute and context parallelism do not rename parameters):

    model.<name>              weights, through `get_state_dict` (DTensors keep their global layout)
    optim.state.<name>.<k>    AdamW state (`step`, `exp_avg`, `exp_avg_sq`)
    ema.<name>                EMA weights when `train.ema_decay > 0`

Everything else is small, mesh-independent and goes to JSON (`megagen.json`, written by rank 0): the step,
the sampler state (data position), the LR schedule and per-group learning rates, the spec, preset and
resolved config, the mesh it was saved with; plus one RNG file per rank.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from megagen.checkpoint.layout import FORMAT, RNG_DIR, VERSION, CheckpointError

log = logging.getLogger("megagen")

MODEL, OPTIM, EMA_KEY = "model", "optim", "ema"
_GROUP_KEYS = ("lr", "initial_lr")  # schedule-driven per-group values; the rest comes from the config


def mesh_of(runtime) -> dict:
    dims = getattr(runtime, "dims", None)
    if dims is None:
        return {"world_size": 1, "dp_replicate": 1, "dp_shard": 1, "cp": 1, "tp": 1}
    return {"world_size": dims.world_size, **dims.sizes()}


def tensor_state(trainer, ema=None) -> dict:
    """The DCP state dict of a trainer (references to live tensors; collective-free)."""
    msd, osd = get_state_dict(trainer.model, trainer.optimizer)
    out = {MODEL: msd, OPTIM: {"state": osd["state"]}}
    if ema is not None:
        out[EMA_KEY] = ema.state_dict()
    return out, osd["param_groups"]


def host_state(trainer, steps_done: int, param_groups: list[dict], ema=None) -> dict:
    """The JSON part: everything that is not a sharded tensor, captured at the step being saved."""
    from megagen.config.load import config_to_dict

    cfg = trainer.cfg
    sched = {k: v for k, v in trainer.scheduler.state_dict().items() if k != "lr_lambdas"}
    state = trainer.state_for_checkpoint(steps_done)
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": "train",
        "step": steps_done,
        "spec": cfg.model.spec,
        "preset": cfg.model.preset,
        "mesh": mesh_of(trainer.runtime),
        "sampler": state.get("sampler"),
        "scheduler": sched,
        "param_groups": [{k: g[k] for k in _GROUP_KEYS if k in g} for g in param_groups],
        "ema_decay": ema.decay if ema is not None else 0.0,
        "contents": [MODEL, OPTIM, *([EMA_KEY] if ema is not None else [])],
        "config": config_to_dict(cfg),
        "torch": torch.__version__,
        "saved_at": time.time(),
    }


# ------------------------------------------------------------------------------------------------ RNG
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state(device: torch.device) -> dict:
    out = {"cpu": _b64(torch.get_rng_state())}
    if device.type == "cuda":
        out["cuda"] = _b64(torch.cuda.get_rng_state(device))
    return out


def write_rng(ckpt: Path, rank: int, device: torch.device) -> Path:
    d = ckpt / RNG_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"rank-{rank:05d}.json"
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(rng_state(device), fh)
    return path


def restore_rng(ckpt: Path, meta: dict, rank: int, world_size: int, device: torch.device) -> bool:
    """Restore this rank's RNG when the world size is unchanged (per-rank streams have no resharding)."""
    if meta.get("mesh", {}).get("world_size") != world_size:
        return False
    f = ckpt / RNG_DIR / f"rank-{rank:05d}.json"
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
        torch.set_rng_state(_unb64(state["cpu"]))
        if device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(_unb64(state["cuda"]), device)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        log.warning("checkpoint %s: RNG state of rank %d not restored (%s)", ckpt, rank, exc)
        return False
    return True


# ------------------------------------------------------------------------------------------------ load
def flatten(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested dicts of tensors → {"a.b.c": tensor}: the names DCP gives the entries of a state dict."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def check_same_model(meta: dict, cfg, ckpt: Path, key: str) -> None:
    if meta.get("kind") != "train":
        raise CheckpointError(
            key,
            f"{ckpt} holds weights only (no optimizer or data position): start from it with "
            "checkpoint.init_from instead",
        )
    saved, want = (meta.get("spec"), meta.get("preset")), (cfg.model.spec, cfg.model.preset)
    if saved != want:
        raise CheckpointError(
            key,
            f"{ckpt} was saved by spec {saved[0]!r} preset {saved[1]!r}, but this run builds spec "
            f"{want[0]!r} preset {want[1]!r}; to start a differently shaped model from its weights use "
            "checkpoint.init_from",
        )


def check_keys(index, target: dict, ckpt: Path, key: str) -> None:
    """Every tensor the run needs is in the checkpoint with the same global shape (clear error if not)."""
    flat = flatten(target)
    saved = index.state_dict_metadata
    missing = sorted(k for k in flat if k not in saved)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(key, f"{ckpt} lacks tensors this model needs: {', '.join(missing[:5])}{more}")
    for k, t in flat.items():
        size = getattr(saved[k], "size", None)
        if size is not None and tuple(size) != tuple(t.shape):
            raise CheckpointError(
                key, f"{ckpt}: {k} has shape {tuple(size)}, this model needs {tuple(t.shape)}"
            )


def prepare_load(trainer, ckpt: Path, meta: dict, ema, key: str) -> dict:
    """Check the checkpoint against this run and build the tensors to load into (collective-free)."""
    from megagen.checkpoint.safe_reader import read_index

    index = read_index(ckpt, key)
    target, param_groups = tensor_state(trainer)
    has_ema = EMA_KEY in meta.get("contents", [])
    if ema is not None and has_ema:
        target[EMA_KEY] = ema.state_dict()
    check_keys(index, target, ckpt, key)
    saved_groups = meta.get("param_groups") or []
    if len(saved_groups) != len(param_groups):
        raise CheckpointError(
            key,
            f"{ckpt}: {len(saved_groups)} optimizer parameter groups saved, this run has {len(param_groups)}",
        )
    return {"target": target, "param_groups": param_groups, "has_ema": has_ema}


def load_into_trainer(trainer, ckpt: Path, meta: dict, ema, prepared: dict, key: str) -> None:
    """Restore model, optimizer, schedule, step, sampler position, EMA and RNG (a collective)."""
    import torch.distributed.checkpoint as dcp

    from megagen.checkpoint.safe_reader import SafeFileSystemReader

    target, param_groups = prepared["target"], prepared["param_groups"]
    dcp.load(target, storage_reader=SafeFileSystemReader(ckpt, key), no_dist=not dist.is_initialized())
    for group, saved in zip(param_groups, meta.get("param_groups") or []):
        group.update(saved)
    set_state_dict(
        trainer.model,
        trainer.optimizer,
        model_state_dict=target[MODEL],
        optim_state_dict={"state": target[OPTIM]["state"], "param_groups": param_groups},
    )
    sched = trainer.scheduler.state_dict()
    sched.update(meta.get("scheduler") or {})
    trainer.scheduler.load_state_dict(sched)
    trainer.step = int(meta["step"])
    trainer.sampler_state = meta.get("sampler")
    if ema is not None and not prepared["has_ema"]:
        log.warning("checkpoint %s has no EMA weights: the EMA restarts from the loaded weights", ckpt)
        ema.reset_to_weights()
    rt = trainer.runtime
    restore_rng(ckpt, meta, rt.rank, rt.world_size, rt.device)
