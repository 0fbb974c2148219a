"""`megagen rehearse` at large layouts: the planner's per-rank bytes against the real sharded build.

Each case is one process playing one rank of a big job on the fake process group (its own subprocess: the
process group is process-wide). Parameters, gradients, optimizer state and FSDP's buffers (its largest unit's
padded all-gather output) must equal the planner's to the byte; saved activations within 10%. Marked slow:
each builds a billion-parameter model's shard and runs a step (≈10–20 s).
"""

import json
import subprocess
import sys

import pytest

EXAMPLES = "examples/configs"

CASES = {
    # 1,024 ranks: Ulysses over cp2 inside tp4, FSDP over 128; two micro-batches under FSDP no-sync
    # (grad_sync=last_micro holds unsharded gradients until the last one)
    "video-1b-tp4-cp2-ulysses-1024-accum2": (
        "video_tiny.yaml",
        ["model.preset=1b", "parallel.tp=4", "parallel.cp=2", "parallel.cp_kind=ulysses",
         "train.global_batch_size=512", "train.micro_batch_size=2", "data.latent_frames=2"],
        1024,
        517,
    ),
    # 768 ranks: a factor 3 on cp, sequence parallel off, a padded sequence (32 tokens over cp3),
    # two micro-batches reduce-scattered each (grad_sync=every_micro)
    "video-1b-tp2-cp3-nosp-768-every-micro": (
        "video_tiny.yaml",
        ["model.preset=1b", "parallel.tp=2", "parallel.cp=3", "parallel.sequence_parallel=false",
         "train.global_batch_size=256", "train.micro_batch_size=1", "parallel.grad_sync=every_micro",
         "data.latent_frames=2"],
        768,
        301,
    ),
    # 512 ranks: HSDP (4 replicas × 64 shards) × tp2 with SP, bf16 compute
    "audio-hsdp4x64-tp2-bf16-512": (
        "audio_tiny.yaml",
        ["parallel.dp_replicate=4", "parallel.dp_shard=64", "parallel.tp=2", "parallel.param_dtype=bf16",
         "train.global_batch_size=256"],
        512,
        129,
    ),
}


def rehearse(config: str, overrides: list[str], world: int, rank: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "megagen", "rehearse", f"{EXAMPLES}/{config}", *overrides,
         "--world-size", str(world), "--rank", str(rank), "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_rehearsal_bytes_match_the_planner(case):
    config, overrides, world, rank = CASES[case]
    r = rehearse(config, overrides, world, rank)
    assert r["world_size"] == world and r["rank"] == rank
    assert set(r["phases_s"]) == {"build", "init", "data_plan", "first_step"}
    mesh = r["mesh"]
    assert mesh["dp_replicate"] * mesh["dp_shard"] * mesh["cp"] * mesh["tp"] == world
    for key in ("params", "grads", "optimizer"):
        assert r["bytes"][key] > 0
        assert r["bytes"][key] == r["predicted"][key], (key, r["bytes"][key], r["predicted"][key])
    measured, predicted = r["bytes"]["activations_peak"], r["predicted"]["activations_peak"]
    assert measured > 0
    assert abs(predicted - measured) <= 0.10 * measured, (measured, predicted)
    buffers, predicted_buffers = r["bytes"]["comm_buffers"], r["predicted"]["comm_buffers"]
    assert buffers > 0 and buffers == predicted_buffers, (buffers, predicted_buffers)
    assert r["peak_rss_gb"] > 0


def test_rank_outside_the_world_is_one_line_naming_the_option():
    proc = subprocess.run(
        [sys.executable, "-m", "megagen", "rehearse", f"{EXAMPLES}/video_tiny.yaml",
         "--world-size", "8", "--rank", "8"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--rank" in lines[0], proc.stderr
