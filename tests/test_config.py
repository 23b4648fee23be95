"""Config loading, overrides and validation: bad configs fail before any compute."""

import functools
import pathlib

import pytest

from prodclip import config as config_lib, config_checks, config_loading

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.py"


def quickstart():
    return config_loading.load_config_file(QUICKSTART)


def test_quickstart_loads_and_validates():
    c = quickstart()
    config_checks.validate(c)
    assert c.data.name == "synthetic"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.py")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path, monkeypatch):
    monkeypatch.setenv("PRODCLIP_MYNTRA_DIR", "/no/such/dir")  # data paths are checked when data is read
    config = config_loading.load(path)
    assert config.train.num_steps > 0


def test_the_unlock_config_is_the_pretrained_one_with_minilm_s_last_block_trained():
    flat = {}
    for name in ("myntra_pretrained", "myntra_pretrained_unlock"):
        config = config_loading.load(ROOT / "configs" / f"{name}.py")
        flat[name] = {key: repr(functools.reduce(getattr, key.split("."), config))
                      for key in config_loading.flat_keys(config)}
    changed = {k for k, v in flat["myntra_pretrained_unlock"].items() if flat["myntra_pretrained"].get(k) != v}
    assert changed == {"optim.unlock_text_blocks", "optim.text_lr_mult", "tokenizer.context_length",
                       "model.text.bert.mean_layers", "model.image.pooling"}


def test_override_sets_typed_values():
    c = quickstart()
    config_loading.apply_overrides(c, ["--config.train.num_steps=7", "--config.loss.name=sigmoid",
                                   "--config.optim.learning_rate=3e-4", "--config.data.eval_splits=test,val"])
    assert c.train.num_steps == 7 and isinstance(c.train.num_steps, int)
    assert c.loss.name == "sigmoid"
    assert c.optim.learning_rate == pytest.approx(3e-4)
    assert c.data.eval_splits == ("test", "val")


def test_unknown_key_lists_valid_keys():
    c = quickstart()
    with pytest.raises(config_lib.ConfigError) as e:
        config_loading.apply_overrides(c, ["--config.train.num_stepz=7"])
    msg = str(e.value)
    assert "train.num_stepz" in msg and "num_steps" in msg and "batch_size" in msg


def test_unknown_group_lists_valid_keys():
    c = quickstart()
    with pytest.raises(config_lib.ConfigError, match="Valid keys: .*data.image_size"):
        config_loading.apply_overrides(c, ["--config.trian.num_steps=7"])


@pytest.mark.parametrize("override", ["--config.train.num_steps=abc", "--config.train.num_steps=1.5",
                                      "--config.model.remat=3", "--config.train.batch_size=True"])
def test_wrong_type_rejected(override):
    with pytest.raises(config_lib.ConfigError, match="train.num_steps|model.remat|train.batch_size"):
        config_loading.apply_overrides(quickstart(), [override])


def test_conv_stem_depth_must_divide_patch():
    c = config_lib.base_config()
    config_loading.apply_overrides(c, ["--config.model.image.stem=conv", "--config.data.image_size=48",
                                   "--config.model.image.patch_size=12", "--config.model.image.stem_depth=3"])
    with pytest.raises(config_lib.ConfigError, match=r"divisible by 8, got model.image.patch_size=12; valid stem_depth: \[1, 2\]"):
        config_checks.validate(c)


def test_non_divisible_patch_size_rejected():
    c = quickstart()
    config_loading.apply_overrides(c, ["--config.model.image.patch_size=7"])
    with pytest.raises(config_lib.ConfigError, match="patch_size=7 does not divide data.image_size=64.*valid patch sizes"):
        config_checks.validate(c)


@pytest.mark.parametrize("override,pattern", [
    ("--config.loss.name=hinge", "loss.name"),
    ("--config.model.image.num_heads=5", "not divisible by num_heads"),
    ("--config.model.image.preset=xxl", "unknown tower preset"),
    ("--config.model.text.pooling=avg", "model.text.pooling"),
])
def test_invalid_values_rejected(override, pattern):
    c = quickstart()
    config_loading.apply_overrides(c, [override])
    with pytest.raises(config_lib.ConfigError, match=pattern):
        config_checks.validate(c)


def test_config_file_with_typo_rejected(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("from prodclip.config import base_config\n"
                    "def get_config():\n    c = base_config(); c.lock(); c.train.num_stepz = 1\n    return c\n")
    with pytest.raises(config_lib.ConfigError, match="num_stepz"):
        config_loading.load_config_file(path)


def test_preset_fields_override_one_by_one():
    c = config_lib.base_config()
    c.lock()
    config_loading.apply_overrides(c, ["--config.model.image.preset=s", "--config.model.image.depth=2"])
    dims = config_lib.tower_dims(c.model.image, config_lib.VIT_PRESETS)
    assert dims["depth"] == 2 and dims["num_heads"] == 6


def test_load_reads_a_run_dir_and_rejects_an_unknown_saved_key(tmp_path):
    """config.load is the one loader: a run directory's config.json round-trips, and a key that
    base_config() does not know is an error naming it (no silent skipping)."""
    import json

    from prodclip import checkpoint

    config = config_loading.load(QUICKSTART, ["--config.train.num_steps=70"])
    checkpoint.write_config(tmp_path, config)
    again = config_loading.load(tmp_path)
    assert again.train.num_steps == 70 and again.to_dict() == config.to_dict()
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["train"]["num_stepz"] = 3
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(config_lib.ConfigError, match="train.num_stepz"):
        config_loading.load(tmp_path)
    with pytest.raises(config_lib.ConfigError, match="not found"):
        config_loading.load(tmp_path / "missing_run")


def test_allowed_values_are_declared_beside_their_fields():
    allowed = config_lib.allowed_values()
    assert allowed["loss.name"] == ("softmax", "sigmoid")
    c = config_lib.base_config()
    for key, values in allowed.items():  # every default is one of its own allowed values
        value = c
        for part in key.split("."):
            value = value[part]
        assert value in values, key
    with pytest.raises(config_lib.ConfigError, match="model.image.pooling"):
        config_loading.load(None, ["--config.model.image.pooling=max"])
