"""`megagen data encode` under torchrun: each rank encodes its share and writes its own shards, rank 0
writes the one manifest and the job's summary; a rerun on another world size redoes only what is lost."""

from __future__ import annotations

import json

import pytest

from megagen.cli import main
from megagen.specs.tae.load import tiny_tae_for_tests
from tests.distributed.torchrun import run_torchrun
from tests.unit.test_data_encode import ENCODE_ARGS, make_source

pytestmark = pytest.mark.slow


def _summary(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{") :])


def test_two_ranks_one_manifest_then_resume_on_one(tmp_path, capsys):
    src = make_source(tmp_path, ul2=True)  # every embedding pre-computed: the ranks load no text encoder
    tae = str(tiny_tae_for_tests(tmp_path))
    out = tmp_path / "ds"
    args = ["data", "encode", str(src), "--tae", tae, "--out", str(out), *ENCODE_ARGS]
    proc = run_torchrun([*args, "--json", "-q"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(proc.stdout)
    assert summary["inputs"] == 7 and summary["encoded"] == 4 and summary["samples"] == 4
    assert summary["bad"] == {"corrupt": 1, "too_short": 1, "truncated": 1}
    manifest = json.loads((out / "manifest.json").read_text())
    files = [s["file"] for b in manifest["buckets"] for s in b["shards"]]
    assert any("shard-r00000-" in f for f in files) and any("shard-r00001-" in f for f in files)
    assert main(["data", "check", str(out)]) == 0

    # lose rank 1's work: one process redoes exactly its inputs and keeps rank 0's shards
    rank1 = [f for f in files if "shard-r00001-" in f]
    lost = sum(s["samples"] for b in manifest["buckets"] for s in b["shards"] if s["file"] in rank1)
    (out / ".encode-done" / "rank-00001.jsonl").unlink()
    capsys.readouterr()
    assert main([*args, "--json", "-q"]) == 0
    rerun = json.loads(capsys.readouterr().out)
    assert rerun["encoded"] == lost == 2 and rerun["skipped_done"] == 4 and rerun["bad"] == {"too_short": 1}
    assert rerun["samples"] == 4
    again = json.loads((out / "manifest.json").read_text())
    assert not any("shard-r00001-" in s["file"] for b in again["buckets"] for s in b["shards"])
    assert main(["data", "check", str(out)]) == 0
