"""`train.cuda_graphs` (megagen/train/cuda_graphs.py): refusal on CPU and on unsupported configs, and the
per-bucket capture plumbing with a stand-in for `torch.cuda.make_graphed_callables` (the real capture is
checked on a GPU by tests/gpu/run_checks.sh)."""

from __future__ import annotations

import pytest
import torch

from megagen.cli import main
from megagen.config import ConfigError, load_config
from megagen.train import cuda_graphs as cg
from megagen.train import train
from megagen.train.loop import Trainer

EXAMPLE = "examples/configs/video_tiny.yaml"


def _cfg(tmp_path, *overrides):
    return load_config(
        EXAMPLE,
        [f"run.dir={tmp_path}", "metrics.progress=none", "metrics.tensorboard=false", *overrides],
    )


def test_cuda_graphs_on_cpu_fail_at_start_up_naming_the_key(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr("megagen.train.loop.build_model", lambda *a: built.append(a))
    with pytest.raises(ConfigError, match=r"train\.cuda_graphs: needs a CUDA device; this run is on cpu"):
        Trainer(_cfg(tmp_path, "train.cuda_graphs=true", "train.steps=1"))
    assert not built, "the refusal must come before the model is built"


def test_cli_reports_the_refusal_in_one_line(tmp_path, capsys):
    rc = main(["train", EXAMPLE, f"run.dir={tmp_path}", "train.cuda_graphs=true", "metrics.progress=none"])
    err = capsys.readouterr().err
    assert rc == 2 and "train.cuda_graphs" in err and "CUDA" in err


@pytest.mark.parametrize(
    "overrides, world, reason",
    [
        (["parallel.tp=2"], 2, "tensor/context parallelism"),
        (["parallel.cp=2"], 2, "tensor/context parallelism"),
        ([], 2, "FSDP"),
        (["train.recompute=full"], 1, "recompute"),
        (["parallel.compile=true"], 1, "parallel.compile"),
        (["train.fp8=true"], 1, "train.fp8"),
    ],
)
def test_unsupported_configs_are_refused_with_the_reason(tmp_path, monkeypatch, overrides, world, reason):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = _cfg(tmp_path, "train.cuda_graphs=true", *overrides)
    assert reason in cg.refusal(cfg, torch.device("cuda"), world)
    assert cg.refusal(_cfg(tmp_path, "train.cuda_graphs=true"), torch.device("cuda"), 1) is None


def test_per_bucket_capture_plumbing_with_a_fake_capture(tmp_path, monkeypatch):
    """Blocks dispatch to the captured callables; one capture per bucket shape; training is unchanged."""
    eager = train(_cfg(tmp_path / "eager", "train.steps=3"))
    captured = []

    def fake_make_graphed_callables(callables, samples, num_warmup_iters, pool=None):
        captured.append([tuple(t.shape) for t in samples[0]])
        return callables  # the _Call wrappers run the blocks' own forward

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake_make_graphed_callables)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: ("pool",))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(cg, "check_cuda_graphs", lambda cfg, runtime: None)
    monkeypatch.setattr("megagen.train.loop.check_cuda_graphs", lambda cfg, runtime: None, raising=False)
    monkeypatch.setattr(cg.BlockGraphs, "capturable", staticmethod(lambda x: True))
    trainer = Trainer(_cfg(tmp_path / "graphs", "train.steps=3", "train.cuda_graphs=true"))
    result = trainer.run()
    assert trainer.cuda_graphs is not None and trainer.cuda_graphs.captures == 1 == len(captured)
    # x, pos, t_mod, context (the None context mask is left out of the captured signature)
    assert captured[0] == [(8, 64, 64), (1, 64, 64), (8, 384), (8, 24, 64)]
    assert result.losses == eager.losses and result.grad_norms == eager.grad_norms
    block = trainer.model.blocks[0]
    args = (torch.zeros(2, 4, 64), torch.zeros(1, 4, 64), torch.zeros(2, 384), torch.zeros(2, 3, 64), None)
    with torch.no_grad():  # no-grad (evaluation) calls stay eager: no new capture
        block(*args)
    assert trainer.cuda_graphs.captures == 1
    block(*(a if a is None else a.requires_grad_() for a in args))  # a new bucket shape: a new capture
    assert trainer.cuda_graphs.captures == 2


def test_graphed_blocks_show_in_the_model_and_keep_their_parameter_names(tmp_path):
    """The blocks' class becomes CudaGraphed<Block> (no patched forward): names and state_dict keys stay."""
    cfg = _cfg(tmp_path, "train.steps=1")
    eager = Trainer(cfg).model
    model = Trainer(cfg).model
    names = [n for n, _ in model.named_parameters()]
    graphs = cg.BlockGraphs(model.blocks)
    block = model.blocks[0]
    assert type(block).__name__ == f"CudaGraphed{type(eager.blocks[0]).__name__}"
    assert isinstance(block, type(eager.blocks[0])) and "forward" not in vars(block)
    assert f"CudaGraphed{type(eager.blocks[0]).__name__}(" in repr(model)
    assert [n for n, _ in model.named_parameters()] == names and graphs.blocks[0] is block
    assert list(model.state_dict()) == list(eager.state_dict())
    assert type(model.blocks[1]) is type(block), "one graphed class per block class"


def test_every_bucket_captures_into_one_pool_with_autocast_caching_off(monkeypatch):
    """torch refuses capture with autocast's cast cache on; buckets share one graph memory pool."""
    seen, pools = [], []

    def fake_make_graphed_callables(callables, samples, num_warmup_iters, pool=None):
        seen.append((pool, torch.is_autocast_cache_enabled()))
        return callables

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake_make_graphed_callables)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: pools.append(object()) or pools[-1])
    monkeypatch.setattr(cg.BlockGraphs, "capturable", staticmethod(lambda x: True))
    graphs = cg.BlockGraphs(torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]))
    for rows in (2, 3):  # two buckets
        graphs.call(0, (torch.zeros(rows, 4, requires_grad=True),))
    assert graphs.captures == 2 and len(pools) == 1
    assert seen == [(pools[0], False), (pools[0], False)]
