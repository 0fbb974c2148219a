"""The plug-in API from outside the package: examples/plugin_spec installs into this venv, registers
`video_dit` by entry point, shows up in `megagen specs list`, and trains under tp2 exactly like one process.

Entry points are read when a process first looks a spec up, so the runs that must find the plug-in by
name are fresh processes (`python -m megagen`, torchrun); the one-process reference runs here, naming
the spec by its dotted path instead (the other registration route).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "examples" / "plugin_spec"
CONFIG = PLUGIN / "video_dit_tiny.yaml"
DIST = "megagen-plugin-example"
TOL = 1e-5
SHORT = [
    "train.steps=3",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "optim.warmup_steps=1",
    "metrics.tensorboard=false",
    "metrics.progress=none",
]


def _installed_from_here() -> bool:
    """The plug-in is installed (editable) from this checkout, with its entry point."""
    importlib.invalidate_caches()
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        return False
    if not any(ep.group == "megagen.specs" and ep.name == "video_dit" for ep in dist.entry_points):
        return False
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    return direct.get("url") == PLUGIN.resolve().as_uri() and direct.get("dir_info", {}).get(
        "editable", False
    )


@pytest.fixture(scope="module")
def plugin():
    return install_plugin()


def install_plugin() -> Path:
    """Install examples/plugin_spec into the running venv once (offline, no dependency resolution)."""
    if not _installed_from_here():
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
        ]
        proc = subprocess.run([*cmd, "-e", str(PLUGIN)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    assert _installed_from_here()
    if importlib.util.find_spec("megagen_plugin_example") is None:
        # Installed after this process started (the editable install's path hook is read at start-up):
        # later registry look-ups in this process load the entry point, so make it importable here too.
        sys.path.append(str(PLUGIN))
    return PLUGIN


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_megagen_specs_list_shows_the_plugin(plugin):
    out = _run([sys.executable, "-m", "megagen", "specs", "list"]).stdout
    assert "video_dit: DiT-style video transformer" in out and "[plug-in: megagen_plugin_example.spec]" in out
    lines = out.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("video_dit:")))
    assert lines[at + 1].split()[0] == "tiny" and "parameters" in lines[at + 1]
    assert lines[at + 2].split()[0] == "xl" and "M parameters" in lines[at + 2]
    for name in ("video", "audio", "upsampler"):
        assert any(line.startswith(f"{name}: ") for line in lines), name


def test_plugin_trains_under_tp2_like_one_process(plugin, tmp_path, monkeypatch):
    run_dir = tmp_path / "tp2"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*torchrun, "-m", "megagen", "train", str(CONFIG), "parallel.tp=2", f"run.dir={run_dir}", *SHORT])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["tflops"] > 0 for r in records)  # the plug-in's flops_per_sample is used

    monkeypatch.syspath_prepend(str(plugin))  # the dotted-path route: no entry point needed
    from megagen.config import load_config
    from megagen.train import train

    overrides = [*SHORT, "model.spec=megagen_plugin_example.spec:SPEC", "metrics.mfu=false"]
    ref = train(load_config(CONFIG, [*overrides, f"run.dir={tmp_path / 'one'}", "metrics.jsonl=false"]))
    ref.runtime.close()
    for kind, values in (("loss", ref.losses), ("grad_norm", ref.grad_norms)):
        for step, (record, b) in enumerate(zip(records, values), start=1):
            a = record[kind]
            assert abs(a - b) <= TOL * abs(b), f"step {step} {kind}: tp2 {a} vs one process {b}"
    assert ref.losses[-1] < ref.losses[0]
