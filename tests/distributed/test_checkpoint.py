"""Checkpoints across processes: exact resume on a mesh, resharding to other meshes, a rank killed mid-save.

Tolerances for resharded runs are the parity tests' (DESIGN.md): loss within 1e-5 relative, every tensor
‖a−b‖/‖b‖ ≤ 1e-5. Resuming on the same mesh must be bit-identical.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from megagen.checkpoint import read_latest
from megagen.checkpoint.layout import COMPLETE
from megagen.checkpoint.safe_reader import read_index
from tests.checkpoint_damage import flip_byte, plant_bytes_payload
from tests.distributed.cases_checkpoint import train_with_checkpoints
from tests.distributed.pool import DistributedPool, WorkerError
from tests.norms import rel_diff

pytestmark = pytest.mark.slow

CASE = "tests.distributed.cases_checkpoint:train_with_checkpoints"
TOL = 1e-5
_straight: dict = {}


def straight_one_process(tmp_path_factory) -> dict:
    """8 steps in this process without checkpoints (computed once)."""
    if "ref" not in _straight:
        _straight["ref"] = train_with_checkpoints([], str(tmp_path_factory.mktemp("straight")))
    return _straight["ref"]


def assert_close_run(got: dict, ref: dict, first_step: int, name: str) -> None:
    for i, (a, b) in enumerate(zip(got["losses"], ref["losses"][first_step:], strict=True)):
        assert abs(a - b) <= TOL * abs(b), f"{name}: loss of step {first_step + i + 1}: {a} vs {b}"
    for kind in ("params", "ema"):
        assert got[kind].keys() == ref[kind].keys()
        for pname, b in ref[kind].items():
            assert rel_diff(got[kind][pname], b) <= TOL, (
                f"{name}: {kind} {pname} rel {rel_diff(got[kind][pname], b):.1e}"
            )


def samples_seen(results: list[dict], from_step: int) -> set:
    return {(s, ids) for r in results for s, ids in r["requests"] if s >= from_step}


def test_exact_resume_on_fsdp2(dist_pool, tmp_path):
    """8 steps straight vs 4 + resume + 4 on the same 2-rank FSDP mesh (async saves): bit-identical."""
    pool = dist_pool(2)
    every = ["checkpoint.every=2", "checkpoint.async_save=true"]
    straight = pool.run(CASE, overrides=[], run_dir=str(tmp_path / "straight"))
    pool.run(CASE, overrides=every, run_dir=str(tmp_path / "run"), stop_at=4)
    resumed = pool.run(CASE, overrides=every, run_dir=str(tmp_path / "run"))
    for rank in range(2):
        assert resumed[rank]["start"]["step"] == 4
        assert resumed[rank]["losses"] == straight[rank]["losses"][4:]
        assert resumed[rank]["requests"] == [r for r in straight[rank]["requests"] if r[0] >= 4]
    for kind in ("params", "ema"):
        for name, ref in straight[0][kind].items():
            assert torch.equal(resumed[0][kind][name], ref), (kind, name)
    assert read_latest(tmp_path / "run" / "checkpoints").name == "step-000008"


def test_reshard_fsdp2xtp2_to_cp2xfsdp2_and_one_process(dist_pool, tmp_path, tmp_path_factory):
    """Save at step 4 under fsdp2×tp2; resume under cp2×fsdp2 and in one process; steps 5–8 match."""
    ref = straight_one_process(tmp_path_factory)
    ckpt_dir = tmp_path / "ckpt"
    pool = dist_pool(4)
    saving = [f"checkpoint.dir={ckpt_dir}", "checkpoint.every=4"]
    pool.run(CASE, overrides=["parallel.tp=2", *saving], run_dir=str(tmp_path / "tp"), stop_at=4)
    step4 = ckpt_dir / "step-000004"
    assert (step4 / COMPLETE).is_file()
    names = {
        k.split(".", 1)[1] for k in read_index(step4, "test").state_dict_metadata if k.startswith("model.")
    }
    assert names == set(ref["params"])  # full-layout parameter names, identical to one process
    resume = [f"checkpoint.resume={step4}"]
    cp = pool.run(CASE, overrides=["parallel.cp=2", *resume], run_dir=str(tmp_path / "cp"))
    one = train_with_checkpoints(resume, str(tmp_path / "one"))
    ref_samples = samples_seen([ref], 4)
    for name, results in (("cp2xfsdp2", cp), ("1 process", [one])):
        assert all(r["start"]["step"] == 4 and r["start"]["sampler"]["step"] == 4 for r in results)
        assert samples_seen(results, 0) == ref_samples, f"{name}: different samples"
        assert all(r["sampler_end"] == ref["sampler_end"] for r in results)
        assert all(r["losses"] == results[0]["losses"] for r in results)
        assert_close_run(results[0], ref, 4, name)


def test_sigkill_during_async_save_leaves_the_previous_checkpoint(tmp_path, tmp_path_factory):
    """Rank 1 is killed inside the async write of step 4: step 2 stays `latest`, and the next start
    resumes from it, cleans the half-written save and finishes the run."""
    ref = straight_one_process(tmp_path_factory)
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    every = ["checkpoint.every=2", "checkpoint.async_save=true"]
    pool = DistributedPool(2)  # a dedicated pool: the kill takes it down
    try:
        with pytest.raises((WorkerError, TimeoutError)):
            pool.run(CASE, overrides=every, run_dir=str(run), kill_rank_at=(1, 4), timeout=120)
    finally:
        pool.close()
    assert (ckpt / "latest").read_text().strip() == "step-000002"
    assert (ckpt / "step-000002" / COMPLETE).is_file()
    assert not (ckpt / "step-000004").exists()
    partial = [p for p in ckpt.iterdir() if p.name.startswith("step-000004.tmp-")]
    assert len(partial) == 1 and not (partial[0] / COMPLETE).exists()
    assert read_latest(ckpt).name == "step-000002"

    resumed = train_with_checkpoints(every, str(run))  # the next start: one process this time
    assert resumed["start"]["step"] == 2 and resumed["resumed_from"].endswith("step-000002")
    assert not any(".tmp-" in p.name for p in ckpt.iterdir())
    assert read_latest(ckpt).name == "step-000008"
    assert_close_run(resumed, ref, 2, "after the crash")


def test_ranks_verify_disjoint_shares_and_agree_on_a_fault(dist_pool, tmp_path):
    """2-rank FSDP resume: each rank hashes its own shard (and a share of the rest), every file once; a
    flipped byte in rank 1's shard, and a pickled bytes entry, are refused on both ranks with the same
    line; the payload never runs."""
    pool = dist_pool(2)
    saved = tmp_path / "saved"
    pool.run(CASE, overrides=["checkpoint.every=4"], run_dir=str(saved), stop_at=4)
    files = set(json.loads((saved / "checkpoints" / "step-000004" / "megagen.json").read_text())["files"])

    run = tmp_path / "run"
    shutil.copytree(saved, run)
    got = pool.run(
        "tests.distributed.cases_checkpoint:files_hashed_at_resume",
        overrides=["checkpoint.every=4", "train.steps=5"],
        run_dir=str(run),
    )
    hashed = [set(g["hashed"]) for g in got]
    assert all(g["start"] == 4 for g in got)
    assert sum(len(g["hashed"]) for g in got) == len(files) and hashed[0] | hashed[1] == files
    assert "__0_0.distcp" in hashed[0] and "__1_0.distcp" in hashed[1]

    errors = "tests.distributed.cases_checkpoint:resume_error"
    flipped = tmp_path / "flipped"
    shutil.copytree(saved, flipped)
    flip_byte(flipped / "checkpoints" / "step-000004" / "__1_0.distcp")
    lines = pool.run(errors, overrides=["checkpoint.every=4"], run_dir=str(flipped))
    assert lines[0] == lines[1] and "step-000004: file __1_0.distcp fails its checksum" in lines[0], lines

    crafted = tmp_path / "crafted"
    shutil.copytree(saved, crafted)
    marker = tmp_path / "PAYLOAD_RAN"
    plant_bytes_payload(crafted / "checkpoints" / "step-000004", marker, shard="__1_0.distcp")
    lines = pool.run(errors, overrides=["checkpoint.every=4"], run_dir=str(crafted))
    assert lines[0] == lines[1] and "'model.pos_t.weight'" in lines[0] and "step-000004" in lines[0], lines
    assert not marker.exists()
