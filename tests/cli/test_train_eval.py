"""``vision train`` and ``vision eval`` end to end on the synthetic shapes (tiny model, CPU)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.helpers.recipes import write_tiny_recipe
from vision.cli import main as cli
from vision.data.synthetic import make_synthetic_dataset
from vision.engine.checkpoint import atomic_save, load_checkpoint_file


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("cli")
    data = tmp / "data"
    info = make_synthetic_dataset(data, num_train=5, num_val=3, image_size=(64, 64), classes=2, max_objects=3,
                                  min_object_size=12, seed=2)
    # one training image is damaged: it must be reported and skipped, not stop the run
    bad = data / "images" / json.loads(Path(info["train"]).read_text())["images"][0]["file_name"]
    bad.write_bytes(bad.read_bytes()[:40])
    cfg = write_tiny_recipe(tmp / "cli.yaml", "cli", data)
    return {"tmp": tmp, "cfg": cfg, "run": tmp / "run", "bad": bad}


def _ensure_trained(trained: dict[str, Path], capfd) -> None:
    """The run the first test trains, for tests run without it (``-k``)."""
    if not (trained["run"] / "last.pt").is_file():
        assert cli(["train", str(trained["cfg"]), "train.seed=5", "--output", str(trained["run"])]) == 0
        capfd.readouterr()


def test_train_writes_the_run_folder(trained, capfd, caplog):
    run = trained["run"]
    assert cli(["train", str(trained["cfg"]), "train.seed=5", "--output", str(run)]) == 0
    out, _ = capfd.readouterr()
    assert any(trained["bad"].name in r.getMessage() for r in caplog.records)  # the damaged image was named
    line = out.strip().splitlines()[-1]
    assert line.startswith("trained 2 iterations (1.00 epochs)") and str(run) in line  # 4 readable images
    assert "box AP" in line and "1 unreadable images skipped" in line
    assert {"config.yaml", "last.pt", "best.pt", "metrics.jsonl", "tb"} <= {p.name for p in run.iterdir()}
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model"]["num_classes"] == 2 and resolved["train"]["seed"] == 5
    ckpt = load_checkpoint_file(run / "best.pt")
    assert ckpt["class_names"] == ["circle", "square"] and ckpt["arch"] == "retinanet"
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in recs] == ["train", "train", "eval"]
    assert {"loss", "lr", "images_per_s", "classification", "bbox_regression"} <= set(recs[0])
    assert {"bbox_AP", "bbox_AP50"} <= set(recs[2])


def test_train_refuses_to_overwrite_a_run(trained, capfd):
    _ensure_trained(trained, capfd)
    assert cli(["train", str(trained["cfg"]), "--output", str(trained["run"])]) == 2
    assert "already holds a run" in capfd.readouterr().err


def test_eval_of_a_vision_checkpoint_needs_no_config(trained, capfd):
    _ensure_trained(trained, capfd)
    best = trained["run"] / "best.pt"
    assert cli(["eval", "--weights", str(best)]) == 0
    out = capfd.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in out and "circle" in out and "square" in out
    metrics = json.loads((trained["run"] / "metrics.json").read_text())
    assert set(metrics["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"}
    assert set(metrics["per_class"]) == {"circle", "square"} and metrics["num_images"] == 3
    # the same weights on the same images as the trainer's own evaluation
    assert metrics["bbox"]["AP"] == pytest.approx(load_checkpoint_file(best)["metrics"]["bbox"]["AP"], abs=1e-9)


def test_eval_of_a_plain_state_dict_takes_the_config(trained, capfd):
    _ensure_trained(trained, capfd)
    plain = trained["tmp"] / "plain.pt"
    atomic_save(load_checkpoint_file(trained["run"] / "best.pt")["model"], plain)
    out_json = trained["tmp"] / "plain_metrics.json"
    assert cli(["eval", str(trained["cfg"]), "--weights", str(plain), "--out", str(out_json)]) == 0
    expected = load_checkpoint_file(trained["run"] / "best.pt")["metrics"]["bbox"]["AP"]
    assert json.loads(out_json.read_text())["bbox"]["AP"] == pytest.approx(expected, abs=1e-9)
    capfd.readouterr()
    assert cli(["eval", "--weights", str(plain)]) == 2
    assert "plain state_dict" in capfd.readouterr().err


def test_eval_rejects_a_broken_weights_file(trained, capfd):
    broken = trained["tmp"] / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    assert cli(["eval", str(trained["cfg"]), "--weights", str(broken)]) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("error: ") and str(broken) in err and len(err.splitlines()) == 1


def test_resume_flag_accepts_overrides_after_it(trained):
    from vision.commands.train import _split_resume

    args = SimpleNamespace(resume="train.epochs=2", overrides=[])
    _split_resume(args)
    assert args.resume == "auto" and args.overrides == ["train.epochs=2"]


def test_resume_with_more_epochs_extends_the_schedule(trained, capfd):
    _ensure_trained(trained, capfd)
    run = trained["run"]
    assert cli(["train", str(trained["cfg"]), "train.seed=5", "--resume", "train.epochs=2", "--output", str(run)]) == 0
    assert capfd.readouterr().out.strip().splitlines()[-1].startswith("trained 4 iterations (2.00 epochs)")
    ckpt = load_checkpoint_file(run / "last.pt")
    assert ckpt["state"]["iteration"] == 4 and ckpt["scheduler"]["lr_lambdas"][0]["total_iters"] == 4
