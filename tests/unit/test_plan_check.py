"""The start-up check of a spec's ParallelPlan: each rule rejects its inconsistency, naming the pattern."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from megagen.config import ConfigError, load_config
from megagen.kernels import AttentionCore
from megagen.parallel.plan import ParallelPlan, TPRegion
from megagen.parallel.plan_check import PlanError, check_plan, plan_problems
from megagen.specs import list_specs


class Attn(nn.Module):
    def __init__(self, d: int = 8, heads: int = 2):
        super().__init__()
        self.head_dim = d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.core = AttentionCore()

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (m(x).view(b, s, -1, self.head_dim) for m in (self.q, self.k, self.v))
        return self.o(self.core(q, k, v).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, d: int = 8, hidden: int = 16):
        super().__init__()
        self.w1, self.w2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.w2(torch.relu(self.w1(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.mlp, self.norm = Attn(), MLP(), nn.LayerNorm(8)

    def forward(self, x):
        return x + self.mlp(x + self.attn(self.norm(x)))


class Toy(nn.Module):
    def __init__(self, layers: int = 2):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(Block() for _ in range(layers))

    def forward(self, tokens, t=None):
        x = self.embed(tokens)
        for b in self.blocks:
            x = b(x)
        return x


GOOD = ParallelPlan(
    blocks="blocks",
    colwise=("blocks.*.attn.[qkv]", "blocks.*.mlp.w1"),
    rowwise=("blocks.*.attn.o", "blocks.*.mlp.w2"),
    regions={"blocks.*.attn": TPRegion(seq_args=("x",)), "blocks.*.mlp": TPRegion(seq_args=("x",))},
    self_attention=("blocks.*.attn.core",),
    sequence_inputs={"tokens": 1},
    head_counts={"self-attention": 2},
)


def _message(plan: ParallelPlan, model: nn.Module | None = None, tp: int = 1) -> str:
    with pytest.raises(PlanError) as info:
        check_plan(model or Toy(), plan, tp, spec_name="toy")
    assert isinstance(info.value, ConfigError)
    return str(info.value)


def test_consistent_plan_passes():
    assert plan_problems(Toy(), GOOD, tp=2) == ([], [])
    check_plan(Toy(), GOOD, tp=2)


@pytest.mark.parametrize("name", sorted(list_specs()))
def test_every_registered_spec_declares_a_consistent_plan(name):
    """Built-in and installed plug-in specs alike, at their first preset, on the meta device."""
    spec = list_specs()[name]
    cfg = load_config(None, [f"model.spec={name}", f"model.preset={next(iter(spec.presets))}"])
    with torch.device("meta"):
        model = spec.build(cfg)
    check_plan(model, spec.parallel_plan(cfg), tp=2, spec_name=name)


def test_rowwise_without_colwise_partner_is_rejected():
    msg = _message(replace(GOOD, colwise=("blocks.*.attn.[qkv]",)))
    assert "model.spec" in msg and "spec 'toy'" in msg
    assert "rowwise 'blocks.*.mlp.w2' (pattern 'blocks.*.mlp.w2') has no colwise partner" in msg
    assert msg.count("has no colwise partner") == 1  # one message per layer kind, not one per layer


def test_colwise_without_rowwise_partner_is_rejected():
    msg = _message(replace(GOOD, rowwise=("blocks.*.attn.o",)))
    assert "colwise 'blocks.*.mlp.w1'" in msg and "no rowwise partner" in msg


def test_feature_sizes_of_partners_must_agree():
    model = Toy()
    for blk in model.blocks:  # w1 now produces 12 features, w2 still takes 16
        blk.mlp.w1 = nn.Linear(8, 12)
    msg = _message(GOOD, model)
    assert "takes in_features 16" in msg and "produce out_features [12]" in msg


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            {"colwise": ("blocks.*.attn.[qkv]", "blocks.*.mlp.w9")},
            "pattern 'blocks.*.mlp.w9' matches no",
        ),
        ({"rowwise": ("blocks.*.attn.o", "blocks.*.mlp")}, "matches 'blocks.*.mlp', a MLP, not an nn.Linear"),
        ({"colwise": (*GOOD.colwise, "embed")}, "colwise 'embed' (pattern 'embed') lies inside no region"),
        ({"blocks": "layers"}, "blocks 'layers' is not a submodule"),
        ({"blocks": "embed"}, "blocks 'embed' is a Linear"),
        (
            {"self_attention": ("blocks.*.attention",)},
            "pattern 'blocks.*.attention' matches no",
        ),
        ({"self_attention": ("blocks.*.norm",)}, "expected (q, k, v, kv_valid)"),
        ({"sequence_inputs": {"latents": 1}}, "sequence input 'latents' is not an argument of Toy.forward"),
        ({"sequence_inputs": {}}, "sequence_inputs is empty"),
        ({"regions": {**GOOD.regions, "blocks.*.norm": TPRegion()}}, "contains no colwise or rowwise"),
        (
            {"regions": {**GOOD.regions, "blocks.*.nope": TPRegion()}},
            "'blocks.*.nope' matches no module",
        ),
        ({"regions": {**GOOD.regions, "blocks.*": TPRegion()}}, "is nested inside region 'blocks.*'"),
        (
            {"regions": {"blocks.*.attn": TPRegion(seq_args=("hidden",)), "blocks.*.mlp": TPRegion()}},
            "Attn.forward of 'blocks.*.attn' has no argument 'hidden' (it has: x)",
        ),
        (
            {"regions": {"blocks.*.attn": TPRegion(seq_args=()), "blocks.*.mlp": TPRegion()}},
            "declares no seq_args",
        ),
        ({"colwise": (*GOOD.colwise, "blocks.*.attn.o")}, "is both colwise"),
    ],
)
def test_each_rule_names_the_offending_pattern(change, expected):
    assert expected in _message(replace(GOOD, **change))


def test_all_problems_reported_on_one_line():
    msg = _message(replace(GOOD, colwise=("blocks.*.attn.[qkv]",), sequence_inputs={"latents": 1}))
    assert "\n" not in msg and "no colwise partner" in msg and "'latents'" in msg


def test_tp_must_divide_features_and_heads():
    with pytest.raises(PlanError) as info:
        check_plan(Toy(), GOOD, tp=3)
    assert info.value.key == "parallel.tp"
    assert str(info.value).startswith(
        "config error: parallel.tp: 3 does not divide the 2 heads of self-attention"
    )
    assert str(info.value).endswith("; and 4 more")  # q, k, v, o, w1, w2 and the heads: the first three
    check_plan(Toy(), GOOD, tp=1)  # sizes are checked only for a real tp


def test_checks_a_meta_model_without_touching_data():
    with torch.device("meta"):
        model = Toy(layers=3)
    check_plan(model, GOOD, tp=2)


def test_trainer_rejects_an_inconsistent_plan_at_start_up(monkeypatch, tmp_path):
    """Wiring: `megagen train` with such a spec stops before the first step, naming model.spec."""
    from megagen.specs import registry
    from megagen.specs.video import VideoSpec
    from megagen.train.loop import Trainer

    class Broken(VideoSpec):
        name = "broken_video"

        def parallel_plan(self, cfg):
            plan = super().parallel_plan(cfg)
            return replace(plan, colwise=tuple(p for p in plan.colwise if "mlp" not in p))

    registry.list_specs()  # load the built-ins first, so the temporary entry is not overwritten
    monkeypatch.setitem(registry._REGISTRY, "broken_video", Broken())
    cfg = load_config(
        "examples/configs/video_tiny.yaml",
        ["model.spec=broken_video", f"run.dir={tmp_path}", "metrics.tensorboard=false"],
    )
    with pytest.raises(ConfigError) as info:
        Trainer(cfg)
    assert info.value.key == "model.spec"
    assert "spec 'broken_video'" in str(info.value) and "'blocks.*.mlp.w2'" in str(info.value)


class Scaled(nn.Module):
    """Wraps the row-parallel output projection with a learned gain: applied after or before the sum?"""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj, self.gain = nn.Linear(d_in, d_out), nn.Parameter(torch.ones(d_out))

    def forward(self, x):
        return self.proj(x) * self.gain


def test_parameters_the_gradient_rule_cannot_classify_are_refused_by_name():
    on_region = Toy()
    for blk in on_region.blocks:
        blk.attn.gain = nn.Parameter(torch.ones(8))  # a region module's own parameter
    msg = _message(GOOD, on_region, tp=2)
    assert "model.spec" in msg and "parameter 'blocks.*.attn.gain'" in msg
    assert "region module 'blocks.*.attn' itself" in msg and msg.count("blocks.*.attn.gain") == 1

    straddling = Toy()
    for blk in straddling.blocks:
        blk.mlp.w2 = Scaled(16, 8)  # MLP.w2 now holds the row-parallel linear
    plan = replace(GOOD, rowwise=("blocks.*.attn.o", "blocks.*.mlp.w2.proj"))
    msg = _message(plan, straddling, tp=2)
    assert (
        "parameter 'blocks.*.mlp.w2.gain'" in msg
        and "contains the row-parallel 'blocks.*.mlp.w2.proj'" in msg
    )

    tied = Toy()
    for blk in tied.blocks:
        blk.attn.q.bias = tied.embed.bias  # one parameter, sharded in a region and replicated outside
    msg = _message(GOOD, tied, tp=2)
    assert "parameter 'embed.bias'" in msg and "shared by modules the rule classifies differently" in msg

    scaled_linear = Toy()
    for blk in scaled_linear.blocks:
        blk.attn.q.scale = nn.Parameter(torch.ones(8))  # the colwise replacement would drop it
    msg = _message(GOOD, scaled_linear, tp=2)
    assert "parameter 'blocks.*.attn.q.scale'" in msg and "keeps only its weight and bias" in msg

    check_plan(on_region, GOOD, tp=1)  # nothing is partial over tp without tensor parallelism
