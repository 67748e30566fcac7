"""A run killed with SIGKILL mid-epoch and resumed ends with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from vision.cli import main as cli
from vision.data.synthetic import make_synthetic_dataset
from vision.engine.checkpoint import load_checkpoint_file

# Faster R-CNN draws from torch's generator (RPN / RoI sampling, multi-scale resize), the data pipeline
# from albumentations' and AutoAugment's own generators: all must come back on resume.
RECIPE = {
    "name": "resume",
    "model": {
        "arch": "faster_rcnn", "backbone": "test_resnet", "fpn_channels": 16, "min_size": [56, 64],
        "max_size": 64, "anchor_sizes": [[8], [16], [32], [48], [64]], "aspect_ratios": [1.0],
    },
    "data": {
        "root": "", "train": {"ann": "train.json", "images": "images"},
        "val": {"ann": "val.json", "images": "images"}, "batch_size": 2, "num_workers": 0,
        "augment": {"hflip": 0.5, "color_jitter": 0.2, "autoaugment": "v0"},
    },
    "train": {
        "device": "cpu", "deterministic": True, "seed": 3, "epochs": 2, "optimizer": "sgd", "lr": 0.02,
        "warmup_iters": 2, "schedule": "cosine", "ema": True, "ema_decay": 0.9, "clip_grad": 5.0,
        "eval_every": 0, "ckpt_every_iters": 2, "log_every": 1,
    },
}

KILLER = textwrap.dedent("""
    import os, signal, sys
    from vision.config import load_config
    from vision.tasks.training import train

    cfg = load_config(sys.argv[1], sys.argv[3:])

    def kill_after_step_5(event, trainer):
        # a step past the checkpoint of iteration 4 (epoch 2, batch 1 of 3): that work is lost
        if event == "step" and trainer.pos.iteration == 5:
            os.kill(os.getpid(), signal.SIGKILL)

    train(cfg, sys.argv[2], hooks=[kill_after_step_5])
""")


@pytest.fixture(autouse=True)
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)  # the in-process runs switch it on for the process


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    make_synthetic_dataset(data, num_train=6, num_val=2, image_size=(64, 64), classes=2, max_objects=3,
                           min_object_size=12, seed=0)
    cfg = json.loads(json.dumps(RECIPE))
    cfg["data"]["root"] = str(data)
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train_log(run: Path) -> list[dict]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in recs if r["kind"] == "train"]


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(recipe: Path, tmp_path: Path):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}
    # the interrupted run loads with two worker processes: augmentation must not depend on it
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(recipe), str(killed), "data.num_workers=2"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    saved = load_checkpoint_file(killed / "last.pt")
    assert saved["state"]["iteration"] == 4 and saved["state"]["epoch"] == 1 and saved["state"]["batch"] == 1

    assert cli(["train", str(recipe), "--resume", "--output", str(killed)]) == 0
    assert cli(["train", str(recipe), "--output", str(straight)]) == 0

    a, b = load_checkpoint_file(killed / "last.pt"), load_checkpoint_file(straight / "last.pt")
    assert a["state"]["iteration"] == b["state"]["iteration"] == 6
    for key in ("model", "model_raw"):  # EMA weights and training weights
        assert a[key].keys() == b[key].keys()
        diff = max((a[key][k].double() - b[key][k].double()).abs().max().item() for k in a[key])
        assert diff <= 1e-6, f"{key}: max abs difference {diff}"
    # the log reads as if nothing had happened: iterations 1..6 once each, with the same losses
    log_a, log_b = _train_log(killed), _train_log(straight)
    assert [r["iter"] for r in log_a] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in log_a] == pytest.approx([r["loss"] for r in log_b], abs=1e-6)
