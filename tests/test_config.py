import pytest

from tests.helpers import CONFIGS
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


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """PyYAML reads 1e-5 as a string (YAML 1.1 wants 1.0e-5); in a float key it is the number."""
    (tmp_path / "c.yaml").write_text("train:\n  lr: 2e-3\n  weight_decay: 1E-4\n")
    cfg = load_config(tmp_path / "c.yaml", ["model.bn_eps=1e-5", "train.momentum=+9e-1"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.model.bn_eps, cfg.train.momentum) == (2e-3, 1e-4, 1e-5, 0.9)
    with pytest.raises(ConfigError, match=r"config key 'train\.lr' must be float, got 'fast'"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"config key 'train\.epochs' must be int, got '1e3'"):
        load_config(None, ["train.epochs=1e3"])


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


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=-0.01", "config key 'train.lr' must be > 0, got -0.01"),
        ("train.lr=0", "config key 'train.lr' must be > 0, got 0.0"),
        ("train.lr=.nan", "config key 'train.lr' must be > 0, got nan"),
        ("model.min_size=[0]", "config key 'model.min_size[0]' must be >= 1, got 0"),
        ("model.min_size=[]", "config key 'model.min_size' must not be an empty list"),
        ("data.num_workers=-1", "config key 'data.num_workers' must be >= 0, got -1"),
        ("data.batch_size=0", "config key 'data.batch_size' must be >= 1, got 0"),
        ("train.epochs=0", "config key 'train.epochs' must be >= 1 (or set train.max_iters), got 0"),
        ("data.augment.hflip=1.5", "config key 'data.augment.hflip' must be in [0, 1], got 1.5"),
        ("model.score_thresh=2", "config key 'model.score_thresh' must be in [0, 1], got 2.0"),
        ("model.nms_thresh=-0.1", "config key 'model.nms_thresh' must be in [0, 1], got -0.1"),
        ("train.momentum=.inf", "config key 'train.momentum' must be in [0, 1], got inf"),
        ("train.warmup_factor=0", "config key 'train.warmup_factor' must be in (0, 1], got 0.0"),
        ("train.max_iters=0", "config key 'train.max_iters' must be >= 1, got 0"),
        ("train.grad_accum=0", "config key 'train.grad_accum' must be >= 1, got 0"),
        ("train.steps=[0.5,-1]", "config key 'train.steps[1]' must be > 0, got -1.0"),
        ("data.repeat_threshold=.nan", "config key 'data.repeat_threshold' must be >= 0, got nan"),
        ("data.augment.scale=[1.2,0.8]", "config key 'data.augment.scale' must be [low, high] with low <= high"),
        ("model.anchor_sizes=[[32],[0]]", "config key 'model.anchor_sizes[1][0]' must be >= 1, got 0"),
        ("model.label_smoothing=1", "config key 'model.label_smoothing' must be in [0, 1), got 1.0"),
        ("model.detections_per_img=0", "config key 'model.detections_per_img' must be >= 1, got 0"),
        ("data.class_names=[a,b,a]", "config key 'data.class_names' names 'a' twice"),
    ],
)
def test_values_out_of_range_are_named(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_epochs_zero_is_fine_when_max_iters_sets_the_length():
    cfg = load_config(None, ["train.epochs=0", "train.max_iters=10"])
    assert cfg.train.max_iters == 10


def test_model_kwargs_are_passed_through_unchecked():
    cfg = load_config(None, ["model.kwargs={topk_candidates: -5, anything: .nan}"])
    assert cfg.model.kwargs["topk_candidates"] == -5


def test_every_shipped_config_is_in_range():

    configs = sorted(CONFIGS.glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_base_that_includes_itself_is_one_line(tmp_path):
    (tmp_path / "self.yaml").write_text("_base_: self.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "self.yaml")
    assert str(e.value).endswith(f"_base_ includes itself ({tmp_path / 'self.yaml'} -> {tmp_path / 'self.yaml'})")
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text("_base_: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("_base_: sub/../c.yaml\n")
    (tmp_path / "c.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "a.yaml")
    assert "_base_ includes itself" in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).count(" -> ") == 3
    (tmp_path / "d.yaml").write_text("_base_: [5]\n")
    with pytest.raises(ConfigError, match=r"d\.yaml: _base_ must be a file name or a list of file names, got \[5\]"):
        load_config(tmp_path / "d.yaml")


def test_shared_base_twice_is_not_a_loop(tmp_path):
    (tmp_path / "common.yaml").write_text("train:\n  lr: 0.5\n")
    (tmp_path / "x.yaml").write_text("_base_: common.yaml\n")
    (tmp_path / "top.yaml").write_text("_base_: [common.yaml, x.yaml]\n")
    assert load_config(tmp_path / "top.yaml").train.lr == 0.5
