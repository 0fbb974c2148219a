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


NON_FINITE = ["inf", "-inf", ".inf", "nan", ".nan", "1e400", "-1e400"]


@pytest.mark.parametrize("text", NON_FINITE)
@pytest.mark.parametrize("key", ["optim.lr", "optim.weight_decay", "train.t_mean", "model.init_std"])
def test_non_finite_floats_are_refused_with_the_key_named(tmp_path, key, text):
    """Every float field must be finite: YAML and overrides both read these as floats (inf / nan)."""
    for source in ("override", "yaml"):
        if source == "override":
            args = (EXAMPLE, [f"{key}={text}"])
        else:
            group, name = key.split(".")
            path = tmp_path / "cfg.yaml"
            path.write_text(f"{group}:\n  {name}: {text}\n")
            args = (path,)
        with pytest.raises(ConfigError, match="must be a finite number|expected a number") as info:
            load_config(*args)
        assert info.value.key == key, (source, str(info.value))


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=-1e-4",
        "optim.beta1=1",
        "optim.beta1=-0.1",
        "optim.beta2=1.0",
        "optim.eps=0",
        "optim.eps=-1e-8",
        "optim.grad_clip=-1",
        "optim.min_lr_ratio=1.5",
        "train.ema_decay=1",
        "train.ema_decay=-0.5",
        "train.cond_dropout=1.01",
        "train.steps=1000000001",
        "train.max_skipped_steps=0",
        "train.nonfinite=ignore",
    ],
)
def test_out_of_range_numbers_name_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLE, [override])
    assert info.value.key == key and str(info.value).startswith(f"config error: {key}: got "), str(info.value)


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=0",
        "optim.beta1=0",
        "optim.beta2=0.999999",
        "optim.eps=1e-30",
        "optim.grad_clip=0",
        "optim.min_lr_ratio=1",
        "train.ema_decay=0.9999",
        "train.cond_dropout=1",
        "train.steps=1000000000",
        "train.nonfinite=skip_step",
    ],
)
def test_edge_values_inside_the_range_are_accepted(override):
    load_config(EXAMPLE, [override])


@pytest.mark.parametrize("weight", [".inf", ".nan", "-1"])
def test_non_finite_bucket_weights_are_refused(tmp_path, weight):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"data:\n  bucket_weights: {{t4_h8_w8: {weight}}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "data.bucket_weights.t4_h8_w8"
