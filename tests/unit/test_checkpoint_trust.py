"""What a checkpoint must prove before it is read (issue 14): no pickled entries, checksums, a checked
manifest, no silent fresh start over unusable checkpoints, and a rotation that keeps the good ones."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import zlib
from pathlib import Path

import pytest

from megagen.checkpoint import CheckpointError, open_checkpoint, preflight
from megagen.checkpoint.layout import COMPLETE, LATEST, META, rotate
from megagen.cli import main as megagen_main

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the worker cases live in tests.distributed
from tests.checkpoint_damage import (  # noqa: E402
    edit_meta,
    flip_byte,
    make_legacy,
    plant_bytes_payload,
    write_meta,
)
from tests.distributed.cases_checkpoint import config, train_with_checkpoints  # noqa: E402

SAVE = ["checkpoint.every=2", "checkpoint.keep=0", "train.steps=4"]
KEY = "model.pos_t.weight"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (sync saves)."""
    run = tmp_path_factory.mktemp("trust")
    train_with_checkpoints(SAVE, str(run))
    return run


@pytest.fixture
def run(saved, tmp_path):
    """A private copy of the saved run: (run dir, its step-000004)."""
    d = tmp_path / "run"
    shutil.copytree(saved, d)
    return d, d / "checkpoints" / "step-000004"


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def _cli_error(capsys, *argv) -> str:
    """Run `megagen ARGV`: it must fail with one line on stderr (no traceback); returns that line."""
    capsys.readouterr()
    assert megagen_main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megagen: config error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------ item 3: pickled entries
@pytest.mark.parametrize("era", ["checksummed", "legacy"])
def test_bytes_entry_runs_nothing_anywhere(run, tmp_path, capsys, era):
    """A DCP index that marks a key as a pickled bytes entry (payload appended to a shard, manifest
    resealed) is refused by every reader, naming the checkpoint and the key; the payload never runs."""
    run_dir, step4 = run
    if era == "legacy":
        make_legacy(step4)
        make_legacy(step4.parent / "step-000002")
    marker = tmp_path / "PAYLOAD_RAN"
    plant_bytes_payload(step4, marker, KEY)
    before = _snapshot(run_dir)

    def refused(text: str) -> None:
        assert "step-000004" in text and repr(KEY) in text, text
        assert not marker.exists()

    with pytest.raises(CheckpointError) as resume:
        train_with_checkpoints([*SAVE, "train.steps=6"], str(run_dir))
    assert resume.value.key == "checkpoint.resume"
    refused(str(resume.value))
    with pytest.raises(CheckpointError) as init:
        train_with_checkpoints([f"checkpoint.init_from={step4}"], str(tmp_path / "fresh"))
    assert init.value.key == "checkpoint.init_from"
    refused(str(init.value))
    out = tmp_path / "out"
    refused(_cli_error(capsys, "ckpt", "info", str(step4)))
    refused(_cli_error(capsys, "ckpt", "export", str(step4), str(out / "w.safetensors")))
    refused(_cli_error(capsys, "ckpt", "average", str(step4), str(step4), "--out", str(out / "avg")))
    prompts = str(tmp_path / "prompts.npz")
    refused(_cli_error(capsys, "sample", str(step4), "--prompt-embeddings", prompts, "--out", str(out)))
    assert not out.exists() and not (tmp_path / "fresh" / "checkpoints").exists()
    assert _snapshot(run_dir) == before


# ------------------------------------------------------------------------------ item 4: silent corruption
@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata", "rng/rank-00000.json"])
def test_flipped_byte_is_refused_naming_the_file(run, capsys, name):
    run_dir, step4 = run
    flip_byte(step4 / name)
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError) as err:
        train_with_checkpoints([*SAVE, "train.steps=6"], str(run_dir))
    assert err.value.key == "checkpoint.resume"
    assert f"step-000004: file {name} fails its checksum" in str(err.value), str(err.value)
    assert _snapshot(run_dir) == before  # nothing rotated, nothing written
    line = _cli_error(capsys, "ckpt", "export", str(step4), str(run_dir / "w.safetensors"))
    assert f"file {name} fails its checksum" in line and not (run_dir / "w.safetensors").exists()
    if name != ".metadata":  # verify=size, the explicit opt-out, checks sizes and the manifest only
        assert open_checkpoint(step4, "CKPT", verify="size")[0] == step4


def test_edited_manifest_is_refused(run):
    """One character of `last_epoch` changed in megagen.json: the LR schedule would silently change."""
    run_dir, step4 = run
    edit_meta(step4, '"last_epoch": 4', '"last_epoch": 5')
    for verify in ([], ["checkpoint.verify=size"]):
        with pytest.raises(CheckpointError, match="megagen.json does not match the checksum in COMPLETE"):
            train_with_checkpoints([*SAVE, "train.steps=6", *verify], str(run_dir))
    with pytest.raises(CheckpointError, match="step-000004: megagen.json does not match"):
        preflight(config([*SAVE, "train.steps=6"], str(run_dir)))


def test_manifest_records_sizes_and_checksums(run):
    _, step4 = run
    meta = json.loads((step4 / META).read_text())
    marker = json.loads((step4 / COMPLETE).read_text())
    assert set(meta["checksums"]) == set(meta["files"]) and "checksums" not in meta["files"]
    assert not (step4 / "checksums").exists()  # the per-rank tables were merged into the manifest
    data = (step4 / "__0_0.distcp").read_bytes()
    assert meta["checksum_algorithm"] == "crc32-16MiB"
    assert meta["checksums"]["__0_0.distcp"] == f"{zlib.crc32(data[: 16 << 20]):08x}" + "".join(
        f"{zlib.crc32(data[i : i + (16 << 20)]):08x}" for i in range(16 << 20, len(data), 16 << 20)
    )
    raw = (step4 / META).read_bytes()
    assert marker["manifest"] == f"crc32-16MiB:{zlib.crc32(raw):08x}"


def test_checkpoint_without_checksums_resumes_with_a_warning(run, caplog):
    """Checkpoints saved before megagen recorded checksums: accepted, sizes verified, one warning."""
    run_dir, step4 = run
    make_legacy(step4)
    with caplog.at_level(logging.WARNING, logger="megagen"):
        out = train_with_checkpoints([*SAVE, "train.steps=5"], str(run_dir))
    assert out["start"]["step"] == 4
    warnings = [r.getMessage() for r in caplog.records if "has no checksums" in r.getMessage()]
    assert len(warnings) == 1 and "step-000004" in warnings[0]
    with open(step4 / "__0_0.distcp", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(CheckpointError, match="__0_0.distcp is truncated or altered"):
        open_checkpoint(step4, "CKPT")


def test_stripped_checksums_are_not_taken_for_an_old_checkpoint(run):
    """COMPLETE without the manifest's checksum next to a manifest with checksums: tampered, refused."""
    _, step4 = run
    marker = json.loads((step4 / COMPLETE).read_text())
    del marker["manifest"]
    (step4 / COMPLETE).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match="lists checksums but COMPLETE has none"):
        open_checkpoint(step4, "CKPT")


@pytest.mark.parametrize("name", ["../../outside", "/etc/hostname", "rng/../../x"])
def test_manifest_naming_a_file_outside_is_refused(run, name):
    _, step4 = run
    meta = json.loads((step4 / META).read_text())
    meta["files"][name] = 1
    meta["checksums"][name] = "00000000"
    write_meta(step4, meta)  # a consistent, resealed manifest: only the name is wrong
    with pytest.raises(CheckpointError, match="the manifest names a file outside the checkpoint"):
        open_checkpoint(step4, "CKPT")


def test_checksums_are_blockwise_and_the_same_with_any_thread_count(tmp_path, monkeypatch):
    from megagen.checkpoint import checksum

    monkeypatch.setattr(checksum, "BLOCK", 1000)
    data = bytes(range(256)) * 10  # 2560 bytes: blocks of 1000, 1000, 560
    f, empty = tmp_path / "f", tmp_path / "e"
    f.write_bytes(data)
    empty.write_bytes(b"")
    want = "".join(f"{zlib.crc32(data[i : i + 1000]):08x}" for i in (0, 1000, 2000))
    for threads in (1, 2, 5):
        assert checksum.digest_files([f, empty], threads) == {f: want, empty: f"{zlib.crc32(b''):08x}"}
    assert checksum.digest_bytes(data) == want
    flip_byte(f, 1500)
    assert checksum.first_bad_block(want, checksum.digest_files([f])[f]) == 1


def test_each_rank_hashes_a_disjoint_share(tmp_path):
    """Rank r gets the shard it wrote (and reads on that mesh); every file once; balanced by size."""
    from megagen.checkpoint.verify import share

    files = {f"__{r}_0.distcp": 1000 for r in range(4)} | {".metadata": 50, "rng/rank-00000.json": 9}
    for world in (1, 2, 3, 4, 6):
        shares = [share(files, r, world) for r in range(world)]
        assert sorted(sum(shares, [])) == sorted(files)  # disjoint and complete
        for r in range(min(world, 4)):
            assert f"__{r}_0.distcp" in shares[r]
    assert share(files, 0, 2) == [".metadata", "__0_0.distcp", "__2_0.distcp"]
    assert share(files, 1, 2) == ["__1_0.distcp", "__3_0.distcp", "rng/rank-00000.json"]


# ------------------------------------------------------------------------------ item 6: no silent restart
def test_step_dirs_without_any_marker_are_refused(run, capsys):
    run_dir, _ = run
    ckpt = run_dir / "checkpoints"
    for p in ckpt.glob("step-*"):
        (p / COMPLETE).unlink()
    (ckpt / LATEST).unlink()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    before = _snapshot(run_dir)
    for attempt in (
        lambda: train_with_checkpoints([*SAVE, "train.steps=6"], str(run_dir)),
        lambda: preflight(config(SAVE, str(run_dir))),
    ):
        with pytest.raises(CheckpointError) as err:
            attempt()
        text = str(err.value)
        assert err.value.key == "checkpoint.dir" and str(ckpt) in text, text
        assert "step-000002, step-000004" in text and "checkpoint.resume=never" in text
    assert _snapshot(run_dir) == before
    fresh = train_with_checkpoints([*SAVE, "train.steps=2", "checkpoint.resume=never"], str(run_dir))
    assert fresh["start"]["step"] == 0  # starting over is still possible, deliberately
    assert not (tmp_dirs := [p for p in ckpt.iterdir() if ".tmp-" in p.name]), tmp_dirs


# ------------------------------------------------------------------------------ item 5: rotation
def _timeline(saved: Path, tmp_path: Path, steps: list[int]) -> Path:
    """A checkpoint directory with sound copies of step-000004 named step-N for each N."""
    d = tmp_path / "ckpts"
    d.mkdir()
    for s in steps:
        shutil.copytree(saved / "checkpoints" / "step-000004", d / f"step-{s:06d}")
    return d


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_rotation_is_not_fooled_by_a_broken_newer_checkpoint(saved, tmp_path):
    d = _timeline(saved, tmp_path, [2, 4, 6, 8])
    edit_meta(d / "step-000006", '"last_epoch": 4', '"last_epoch": 5')  # has COMPLETE, but is broken
    assert [p.name for p in rotate(d, 2, d / "step-000008")] == ["step-000002"]
    assert _names(d) == ["step-000004", "step-000006", "step-000008"]  # 6 did not count; 4 stays


def test_rotation_deletes_nothing_when_the_newest_is_broken(saved, tmp_path):
    d = _timeline(saved, tmp_path, [2, 4, 6])
    (d / "step-000006" / "__0_0.distcp").unlink()
    assert rotate(d, 1, d / "step-000006") == []
    assert _names(d) == ["step-000002", "step-000004", "step-000006"]


def test_rotation_never_deletes_a_later_checkpoint(saved, tmp_path):
    """Resumed from step 2 of a run that reached 8: saving step 4 (keep=1) must not delete 6 and 8."""
    d = _timeline(saved, tmp_path, [2, 4, 6, 8])
    assert [p.name for p in rotate(d, 1, d / "step-000004")] == ["step-000002"]
    assert _names(d) == ["step-000004", "step-000006", "step-000008"]
    assert not any(".tmp-" in n for n in _names(d))
