"""The kernel backend registry: selection, fallback, the one-line extras report, config wiring, and that the
model's layers really dispatch through it."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from megagen import kernels as K
from megagen.config import ConfigError, load_config
from megagen.kernels import backend as registry
from megagen.runtime_setup import configure_kernels

EXAMPLE = "examples/configs/video_tiny.yaml"
OPS = (
    "rms_norm",
    "rms_norm_modulate",
    "modulate",
    "gated_residual",
    "swiglu",
    "factorized_position",
    "rotary",
)


@pytest.fixture(autouse=True)
def _reset():
    K.configure("auto", "auto", False)
    yield
    K.configure("auto", "auto", False)


def test_every_op_has_a_torch_reference_and_fused_ops_a_triton_kernel():
    for op in OPS:
        assert "torch" in registry.implementations(op), op
    for op in ("rms_norm", "rms_norm_modulate", "gated_residual", "swiglu", "factorized_position", "rotary"):
        assert "triton" in registry.implementations(op), op


@pytest.mark.parametrize("backend", registry.BACKENDS)
def test_cpu_tensors_always_get_the_torch_reference(backend):
    K.configure(backend)
    for op in OPS:
        assert registry.resolve(op, torch.device("cpu"))[0] == "torch"


def test_cuda_resolution_order_and_fallback_for_missing_extras(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(registry, "_installed", {"triton": True, "te": False})
    assert registry.resolve("swiglu", cuda, "auto")[0] == "triton"
    assert registry.resolve("swiglu", cuda, "te")[0] == "triton"  # TE has no swiglu, and is absent
    assert registry.resolve("swiglu", cuda, "torch")[0] == "torch"
    assert registry.resolve("modulate", cuda, "triton")[0] == "torch"  # no fused kernel: the reference
    monkeypatch.setattr(registry, "_installed", {"triton": False, "te": False})
    assert registry.resolve("rms_norm", cuda, "triton")[0] == "torch"  # triton absent: no crash


def test_missing_extras_are_reported_in_one_line(caplog, monkeypatch):
    monkeypatch.setattr(registry, "_reported", False)
    monkeypatch.setattr(registry, "_installed", {"triton": False, "te": False})
    with caplog.at_level(logging.INFO, logger="megagen.kernels"):
        K.configure("triton")
        K.configure("te")
    lines = [r.getMessage() for r in caplog.records if r.name == "megagen.kernels"]
    assert len(lines) == 1, lines
    assert "triton: not installed" in lines[0] and "transformer_engine: not installed" in lines[0]


def test_fp8_without_transformer_engine_warns_once_and_runs_torch(caplog, monkeypatch):
    monkeypatch.setattr(registry, "_fp8_warned", False)
    monkeypatch.setattr(registry, "_installed", {"triton": False, "te": False})
    with caplog.at_level(logging.WARNING, logger="megagen.kernels"):
        K.configure("auto", "auto", True)
        K.configure("auto", "auto", True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "train.fp8" in warnings[0] and "transformer_engine" in warnings[0]
    assert K.linear.te_parallel_linear(torch.nn.Linear(4, 4), "column", None, 1, 0, False) is None


def test_unknown_backend_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="kernels.backend"):
        load_config(EXAMPLE, ["kernels.backend=cuda"])
    with pytest.raises(ConfigError, match="kernels.attention"):
        load_config(EXAMPLE, ["kernels.attention=ring"])
    with pytest.raises(ConfigError, match="parallel.compile_backend"):
        load_config(EXAMPLE, ["parallel.compile_backend=tvm"])
    cfg = load_config(EXAMPLE, ["kernels.backend=torch", "kernels.attention=math", "train.fp8=true"])
    assert configure_kernels(cfg) == registry.KernelSettings("torch", "math", True)
    with pytest.raises(ValueError, match="kernels.backend"):
        K.configure("fast")


def _tiny_forward(cfg):
    from megagen.specs import get_spec

    spec = get_spec("video")
    torch.manual_seed(0)
    model = spec.build(cfg)
    spec.init_weights(model, cfg)
    b, s = 2, 16
    arch = model.arch
    inputs = {
        "tokens": torch.randn(b, s, arch.patch_dim),
        "pos_ids": torch.zeros(1, s, 3, dtype=torch.long),
        "t": torch.rand(b),
        "text": {n: torch.randn(b, 3, w) for n, w in arch.text_encoders.items()},
        "text_valid": {n: torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool) for n in arch.text_encoders},
    }
    torch.nn.init.normal_(model.out_proj.weight, std=0.02)  # non-zero output, so ops are visible
    return model, inputs


def test_the_video_model_dispatches_through_the_registry(monkeypatch):
    cfg = load_config(EXAMPLE)
    model, inputs = _tiny_forward(cfg)
    registry.reset_usage()
    out = model(**inputs)
    used = registry.usage()
    layers = model.arch.layers
    assert used[("rms_norm", "torch")] >= layers  # cross-attention norms (and the text projectors)
    assert used[("rms_norm_modulate", "torch")] == 2 * layers + 1  # attention, MLP, output
    assert used[("gated_residual", "torch")] == 2 * layers
    assert used[("factorized_position", "torch")] == 1
    assert used[("swiglu", "torch")] == layers
    assert used[("attention", "sdpa")] == 2 * layers
    # a different implementation registered for the backend changes the model's output: the dispatch is live
    monkeypatch.setitem(registry._registry["swiglu"], "torch", lambda g, u: torch.zeros_like(g))
    assert not torch.allclose(model(**inputs), out)


def test_trainer_applies_the_kernels_config(tmp_path):
    from megagen.train import train

    cfg = load_config(
        EXAMPLE,
        [
            f"run.dir={tmp_path}",
            "train.steps=1",
            "metrics.progress=none",
            "metrics.tensorboard=false",
            "kernels.backend=torch",
            "kernels.attention=math",
        ],
    )
    train(cfg)
    assert registry.settings() == registry.KernelSettings("torch", "math", False)


def test_fast_backends_requested_on_cpu_import_nothing_and_match_torch():
    base = load_config(EXAMPLE)
    model, inputs = _tiny_forward(base)
    want = model(**inputs)
    configure_kernels(
        load_config(EXAMPLE, ["kernels.backend=triton", "kernels.attention=te", "train.fp8=true"])
    )
    assert torch.equal(model(**inputs), want)
    for name in ("megagen.kernels.triton_ops", "megagen.kernels.te_ops", "triton", "transformer_engine"):
        assert name not in sys.modules, name
