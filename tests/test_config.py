import pytest

from vision.config import Config, load_config, save_config
from vision.errors import ConfigError


def test_defaults_file_and_overrides_compose(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  backbone: resnet18\n  min_size: [480]\ntrain:\n  lr: 0.02\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\nname: child\ntrain:\n  epochs: 3\n")
    cfg = load_config(child, ["train.lr=0.05", "model.min_size=[448,480]", "data.augment.hflip=0"])
    assert cfg.name == "child"
    assert cfg.model.backbone == "resnet18"  # inherited
    assert cfg.train.epochs == 3  # from the file
    assert cfg.train.lr == 0.05  # override wins over base
    assert cfg.model.min_size == [448, 480]
    assert cfg.data.augment.hflip == 0.0 and isinstance(cfg.data.augment.hflip, float)
    assert cfg.train.momentum == Config().train.momentum  # untouched default


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.backbon=resnet18", "unknown config key 'model.backbon' (did you mean 'model.backbone'?)"),
        ("trian.lr=1", "unknown config key 'trian'"),
        ("train.amp=3", "config key 'train.amp' must be true or false"),
        ("train.epochs=1.5", "config key 'train.epochs' must be int"),
        ("model.min_size=abc", "config key 'model.min_size' must be a list"),
        ("train.lr", "must look like key=value"),
    ],
)
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  augment:\n    hflipp: 0.5\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.augment\.hflipp'"):
        load_config(path)


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  backbone: [resnet18\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: invalid YAML at line \d+"):
        load_config(path)


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["name=x", "model.anchor_sizes=[[16],[32]]", "train.clip_grad=10"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
