"""Recording a model's build + init on the meta device and replaying one tensor at a time
(parallel/init_record.py), and the build sequence on top of it (megagen/train/build.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from megagen.config import ConfigError, load_config
from megagen.parallel.init_record import recording
from megagen.parallel.materialize import materialize
from megagen.specs import get_spec
from megagen.specs.base import init_model
from megagen.train.build import record_model

EXAMPLE = "examples/configs/video_tiny.yaml"
ROOT = Path(__file__).resolve().parents[2]


def _recorded(make, seed: int = 0):
    with recording(seed) as record:
        model = make()
    record.name_tensors(model)
    return model, record


def _replayed(make, seed: int = 0) -> dict[str, torch.Tensor]:
    model, record = _recorded(make, seed)
    return {n: record.full_tensor(n) for n in record.tensors}


class Toy(nn.Module):
    """What init code does: default inits, an init_weights, a view write, a tied and a derived
    parameter, a buffer computed in __init__, an out-of-place random draw added in place."""

    def __init__(self, live: bool = False, extra: bool = False):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(6, 4, bias=False)
        self.norm = nn.LayerNorm(4)
        self.tied = nn.Linear(6, 4, bias=False)
        self.tied.weight = self.b.weight
        if extra:
            self.extra = nn.Linear(6, 4)
        self.register_buffer("freqs", torch.exp(-torch.arange(4, dtype=torch.float32) / 4))
        with torch.no_grad():
            nn.init.normal_(self.a.weight, std=0.5)
            self.a.weight[:, 4:].zero_()
            self.b.weight.copy_(self.a.weight * 2 + 1)
            if live:
                self.a.weight.add_(torch.randn_like(self.a.weight), alpha=0.1)


def test_replay_reproduces_what_init_code_does():
    t = _replayed(Toy)
    w = t["a.weight"]
    assert torch.all(w[:, 4:] == 0) and torch.all(w[:, :4] != 0)  # a write through a view
    assert 0.3 < float(w[:, :4].std()) < 0.7
    assert torch.equal(t["b.weight"], w * 2 + 1) and torch.equal(t["tied.weight"], t["b.weight"])
    assert torch.equal(t["freqs"], torch.exp(-torch.arange(4, dtype=torch.float32) / 4))
    assert torch.equal(t["norm.weight"], torch.ones(4)) and torch.equal(t["norm.bias"], torch.zeros(4))
    bound = 6**-0.5  # nn.Linear's default (kaiming-uniform) init of the bias, never overwritten
    assert torch.all(t["a.bias"].abs() <= bound) and len(set(t["a.bias"].tolist())) == 4


def test_values_depend_on_seed_and_name_only():
    base = _replayed(Toy)
    again = _replayed(Toy)
    assert all(torch.equal(base[n], again[n]) for n in base)
    other_seed = _replayed(Toy, seed=1)
    assert not torch.equal(base["a.weight"], other_seed["a.weight"])
    # a parameter added elsewhere (drawing random numbers before some others) changes nothing else
    grown = _replayed(lambda: Toy(extra=True))
    assert all(torch.equal(base[n], grown[n]) for n in base)
    # replay order does not matter either
    model, record = _recorded(Toy)
    backwards = {n: record.full_tensor(n) for n in reversed(list(record.tensors))}
    assert all(torch.equal(base[n], backwards[n]) for n in base)


def test_out_of_place_random_draws_belong_to_the_tensor_they_flow_into():
    plain, live = _replayed(Toy), _replayed(lambda: Toy(live=True))
    noise = live["a.weight"] - plain["a.weight"]
    assert 0.05 < float(noise.std()) < 0.2 and torch.equal(live["a.bias"], plain["a.bias"])
    assert torch.equal(_replayed(lambda: Toy(live=True))["a.weight"], live["a.weight"])


def test_a_tensor_overwritten_whole_replays_only_its_last_write():
    """nn.Linear's kaiming init of a weight that init code then redraws costs nothing at replay."""
    model, record = _recorded(Toy)
    ops = [record.ops[i].func.__name__ for i in record._needed_ops(record.tensors["a.weight"].key)]
    assert ops == ["normal_.default", "zero_.default"]
    live_model, live = _recorded(lambda: Toy(live=True))
    ops = [live.ops[i].func.__name__ for i in live._needed_ops(live.tensors["a.weight"].key)]
    assert ops == ["normal_.default", "zero_.default", "randn_like.default", "add_.Tensor"]


@pytest.mark.parametrize("name", ["video", "upsampler", "audio"])
def test_spec_init_replays_its_deterministic_parts_exactly(name):
    """Against the eager init on the CPU: every tensor the spec sets without randomness is identical
    (ones, zeros, the upsampler's zero input columns), the random ones are drawn with the same std."""
    cfg = load_config(EXAMPLE, [f"model.spec={name}", "model.qk_norm=true"])
    spec = get_spec(name)
    torch.manual_seed(0)
    eager = spec.build(cfg)
    init_model(spec, eager, cfg)
    model, record = record_model(cfg, spec)
    for n, p in eager.named_parameters():
        p, got = p.detach(), record.full_tensor(n)
        if len(torch.unique(p)) <= 1:
            assert torch.equal(got, p), n
        else:
            assert abs(float(got.std()) / float(p.std()) - 1) < 0.5, n
    if name == "upsampler":
        patch = spec.arch(cfg).patch_dim
        assert torch.all(record.full_tensor("patch_embed.weight")[:, patch:] == 0)


def test_materialized_model_is_the_replayed_one():
    cfg = load_config(EXAMPLE, ["model.init=live"])
    model, record = record_model(cfg, get_spec("video"))
    assert all(p.is_meta for p in model.parameters())
    materialize(model, record.full_tensor, torch.device("cpu"))
    assert all(torch.equal(p, record.full_tensor(n)) for n, p in model.named_parameters())


def test_init_that_reads_values_is_refused_naming_the_spec():
    from megagen.specs.video.spec import VideoSpec

    class Peeking(VideoSpec):
        name = "peeking"

        def init_weights(self, model, cfg):
            if float(model.out_proj.weight.abs().max()) > 0:  # reads a value: impossible on meta
                pass

    with pytest.raises(ConfigError) as info:
        record_model(load_config(EXAMPLE), Peeking())
    assert info.value.key == "model.spec" and "'peeking'" in str(info.value) and "meta" in str(info.value)


# One process playing one rank of a larger job on torch's fake process group (no peers, collectives
# move no data): the same build path, and each local shard is the rank's block of the full tensor,
# located independently of megagen by torch's compute_local_shape_and_global_offset.
FAKE_RANK = textwrap.dedent(
    """
    import json, sys, warnings
    import torch, torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    warnings.filterwarnings("ignore")
    rank, world, overrides = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from megagen.config import load_config
    from megagen.runtime_setup import distributed_runtime
    from megagen.specs import get_spec
    from megagen.train.build import build_model, record_model
    cfg = load_config("examples/configs/video_tiny.yaml", ["model.init=live", *overrides])
    spec = get_spec("video")
    model = build_model(cfg, spec, distributed_runtime(cfg))
    _, record = record_model(cfg, spec)
    wrong, sharded = [], 0
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        full = record.full_tensor(name)
        if isinstance(p, DTensor):
            shape, offset = compute_local_shape_and_global_offset(full.shape, p.device_mesh, p.placements)
            full = full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
            sharded += p.to_local().numel() < p.numel()
            p = p.to_local()
        wrong += [] if torch.equal(p, full) else [name]
    print(json.dumps({"wrong": wrong, "sharded": sharded}))
    """
)


@pytest.mark.parametrize(
    "rank, world, overrides",
    [
        (5, 8, ["parallel.dp_shard=2", "parallel.cp=2", "parallel.tp=2"]),
        (3, 4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    ],
)
def test_one_rank_of_a_larger_job_builds_alone_on_the_fake_backend(rank, world, overrides):
    done = subprocess.run(
        [sys.executable, "-c", FAKE_RANK, str(rank), str(world), *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["wrong"] == [] and result["sharded"] > 10
