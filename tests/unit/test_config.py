"""Config loading, overrides and validation: every bad value names its key."""

import pytest
import yaml

from megagen.config import Config, ConfigError, describe_keys, load_config, save_config

EXAMPLE = "examples/configs/video_tiny.yaml"


def test_defaults_and_yaml_and_overrides(tmp_path):
    cfg = load_config(EXAMPLE, ["train.steps=7", "parallel.cp_kind=ulysses", "metrics.tensorboard=false"])
    assert cfg.train.steps == 7
    assert cfg.parallel.cp_kind == "ulysses"
    assert cfg.metrics.tensorboard is False
    assert cfg.optim.lr == pytest.approx(1e-3)  # from the YAML
    assert isinstance(Config().parallel.tp, int)


@pytest.mark.parametrize(
    "override, key",
    [
        ("parallel.tp=abc", "parallel.tp"),
        ("parallel.cp_kind=ring", "parallel.cp_kind"),
        ("foo.bar=1", "foo.bar"),
        ("train.nope=1", "train.nope"),
        ("train.steps=0", "train.steps"),
        ("optim.lr=fast", "optim.lr"),
        ("metrics.jsonl=maybe", "metrics.jsonl"),
        ("train.micro_batch_size=3", "train.micro_batch_size"),
        ("parallel.dp_shard=0", "parallel.dp_shard"),
        ("noequals", "noequals"),
    ],
)
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLE, [override])
    assert info.value.key == key
    assert key in str(info.value)


def test_bad_yaml_value_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"parallel": {"tp": "two"}}))
    with pytest.raises(ConfigError, match="parallel.tp"):
        load_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="file not found"):
        load_config("does/not/exist.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(EXAMPLE, ["run.seed=3", "parallel.tp=2"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_describe_keys_lists_every_group():
    text = describe_keys()
    for group in ("run", "model", "parallel", "data", "optim", "train", "checkpoint", "metrics"):
        assert f"  {group}:" in text
    assert "parallel.cp_kind='allgather_kv' {allgather_kv|ulysses}" in text
