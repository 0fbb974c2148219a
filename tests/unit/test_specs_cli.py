"""`megagen specs [list]`: every registered spec with its presets and meta-device parameter counts."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

from megagen.config import ConfigError
from megagen.specs import registry
from megagen.specs.cli import (
    add_specs_commands,
    count_parameters,
    describe_specs,
    format_specs,
    human,
    run_specs_command,
)
from megagen.specs.video import VideoSpec


def parse(argv: list[str]):
    parser = argparse.ArgumentParser(prog="megagen")
    add_specs_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def rows():
    return {r["name"]: r for r in describe_specs()}


def test_lists_the_builtin_specs_with_presets_and_counts(rows):
    for name in ("video", "audio", "upsampler"):
        assert name in rows, f"{name} is not registered"
        assert not rows[name]["plugin"] and rows[name]["description"]
        for p in rows[name]["presets"]:
            assert "error" not in p, (name, p)
            assert p["parameters"] > 0
    video = {p["name"]: p["parameters"] for p in rows["video"]["presets"]}
    assert list(video) == ["tiny", "small", "1b", "5b", "30b"]
    assert 29e9 <= video["30b"] <= 30.5e9  # ≈ 30 B


def test_large_presets_are_counted_on_the_meta_device(monkeypatch):
    devices = []
    original = VideoSpec.build

    def build(self, cfg):
        devices.append(torch.empty(()).device.type)
        return original(self, cfg)

    monkeypatch.setattr(VideoSpec, "build", build)
    n = count_parameters(registry.list_specs()["video"], "30b")
    assert devices == ["meta"] and n > 29e9


def test_text_output_and_both_spellings(capsys):
    assert (
        vars(parse(["specs"]))
        == vars(parse(["specs", "list"]))
        == {
            "command": "specs",
            "action": "list",
            "names": [],
            "json": False,
        }
    )
    assert run_specs_command(parse(["specs"])) == 0
    out = capsys.readouterr().out
    assert "\nvideo: Movie Gen Video" in "\n" + out
    assert "  30b " in out and " B parameters (29," in out
    assert "[built in]" in out


def test_json_output_for_named_specs(capsys):
    assert run_specs_command(parse(["specs", "list", "video", "audio", "--json"])) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["audio", "video"]
    with pytest.raises(ConfigError, match="unknown spec"):
        run_specs_command(parse(["specs", "list", "nope"]))


def test_a_broken_preset_does_not_hide_the_others(monkeypatch):
    class Half(VideoSpec):
        """A spec whose large preset cannot be built."""

        name = "half"

        def build(self, cfg):
            if cfg.model.preset == "30b":
                raise RuntimeError("no such kernel")
            return super().build(cfg)

    registry.list_specs()
    monkeypatch.setitem(registry._REGISTRY, "half", Half())
    text = format_specs(describe_specs(["half"]))
    assert f"half: A spec whose large preset cannot be built.  [plug-in: {Half.__module__}]" in text
    assert re.search(r"\n  30b +build failed: RuntimeError: no such kernel", text)
    assert "  tiny " in text


def test_human_units():
    assert [human(n) for n in (999, 176_640, 934_147_648, 29_303_248_960)] == [
        "999",
        "176.64 K",
        "934.15 M",
        "29.30 B",
    ]
