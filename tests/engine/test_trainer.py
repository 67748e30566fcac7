"""The trainer's parts and loop, on a tiny stand-in detector and an in-memory data set (fast)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vision.config import Config
from vision.data.dataset import collate_detection
from vision.data.records import Categories, DetectionSet, ImageRecord
from vision.engine.checkpoint import atomic_save, load_checkpoint_file
from vision.engine.optim import WarmupSchedule, build_optimizer, build_scheduler, param_groups
from vision.engine.seeding import setup_runtime
from vision.engine.trainer import Trainer, TrainingDiverged
from vision.errors import DataError
from vision.tasks.detection import box_ap, predict_dataset

# --------------------------------------------------------------------------------------------------
# stand-ins that follow the detector and dataset contracts


class TinyDetector(nn.Module):
    """torchvision-style: a dict of losses in training, a list of detections in eval mode.

    The loss is the mean over images, as torchvision's detectors average over the batch, so two
    accumulated half batches equal one full batch.  ``nan_at`` makes given forward calls non-finite.
    """

    def __init__(self, nan_at: tuple[int, ...] = ()):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 4)
        self.nan_at = set(nan_at)
        self.calls = 0
        self.last_dtype: torch.dtype | None = None

    def features(self, images: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(images)
        h = self.conv(x)
        self.last_dtype = h.dtype
        return self.head(self.norm(h).mean((2, 3)))

    def forward(self, images, targets=None):
        pred = self.features(images)
        if self.training:
            self.calls += 1
            goal = torch.stack([t["boxes"][0] / 16.0 for t in targets])
            loss = ((pred.float() - goal) ** 2).mean(1).mean()
            if self.calls in self.nan_at:
                loss = loss * float("nan")
            return {"loss_box": loss}
        box = torch.tensor([[2.0, 2.0, 8.0, 8.0]])
        return [{"boxes": box, "scores": p[:1].sigmoid(), "labels": torch.ones(1, dtype=torch.int64)} for p in pred]


def tiny_set(n: int = 8) -> DetectionSet:
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        x, y = rng.uniform(0, 8, 2)
        boxes = np.array([[x, y, x + 6, y + 6]], np.float32)
        records.append(ImageRecord(i + 1, f"{i}.png", f"/nonexistent/{i}.png", 16, 16, boxes, np.array([1])))
    return DetectionSet(Categories.from_names(["thing"]), records, source="memory")


class TinyDataset(torch.utils.data.Dataset):
    """Images from a fixed generator plus noise from torch's global generator (as augmentation would)."""

    def __init__(self, det_set: DetectionSet):
        self.det_set = det_set
        self.transform = None

    def __len__(self) -> int:
        return len(self.det_set)

    def __getitem__(self, index: int):
        r = self.det_set.records[index]
        g = torch.Generator().manual_seed(index)
        image = torch.rand(3, 16, 16, generator=g) + 0.01 * torch.rand(3, 16, 16)
        return image, {"boxes": torch.from_numpy(r.boxes), "labels": torch.from_numpy(r.labels), "image_id": r.image_id}


def make_cfg(**train) -> Config:
    cfg = Config()
    cfg.data.batch_size = 2
    cfg.data.num_workers = 0
    t = cfg.train
    t.device, t.optimizer, t.lr, t.momentum, t.weight_decay = "cpu", "sgd", 0.1, 0.9, 0.0
    t.warmup_iters, t.schedule, t.epochs, t.eval_every, t.ckpt_every_iters, t.log_every = 0, "constant", 2, 1, 0, 1
    t.deterministic = True
    for k, v in train.items():
        setattr(t, k, v)
    return cfg


def make_trainer(tmp_path: Path, cfg: Config, model: nn.Module | None = None, evaluator=None, hooks=(), n: int = 8):
    setup_runtime(cfg)
    det_set = tiny_set(n)
    model = model or TinyDetector()
    return Trainer(
        cfg, tmp_path / "run", model=model, train_set=det_set, train_dataset=TinyDataset(det_set),
        collate_fn=collate_detection, val_set=det_set, val_dataset=TinyDataset(det_set), predict_fn=predict_dataset,
        evaluator=evaluator or (lambda ds, preds: {"bbox": {"AP": 0.5}}), score_fn=box_ap, score_name="box AP",
        hooks=hooks,
    )


@pytest.fixture(autouse=True)
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# schedule and optimizer


def test_schedule_values_match_hand_computed():
    cos = WarmupSchedule(100, "cosine", warmup_iters=0)
    assert cos(0) == 1.0
    assert cos(25) == pytest.approx(0.8535533905932737, abs=1e-12)  # (1 + cos(pi/4)) / 2
    assert cos(50) == pytest.approx(0.5, abs=1e-12)
    assert cos(100) == pytest.approx(0.0, abs=1e-12)
    step = WarmupSchedule(100, "step", steps=[0.5, 0.75], gamma=0.1)
    assert [step(49), step(50), step(74), step(75), step(99)] == pytest.approx([1, 0.1, 0.1, 0.01, 0.01])
    warm = WarmupSchedule(100, "constant", warmup_iters=10, warmup_factor=0.001)
    assert [warm(0), warm(5), warm(10), warm(60)] == pytest.approx([0.001, 0.5005, 1.0, 1.0])
    both = WarmupSchedule(100, "cosine", warmup_iters=10, warmup_factor=0.0)
    assert both(5) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0.05)))


def test_scheduler_sets_the_optimizer_lr_per_iteration():
    cfg = make_cfg(lr=0.2, schedule="cosine", warmup_iters=0)
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, cfg.train)
    sched = build_scheduler(opt, cfg.train, total_iters=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.2, 0.2 * (1 + math.sqrt(0.5)) / 2, 0.1, 0.2 * (1 - math.sqrt(0.5)) / 2])
    # the horizon travels in the scheduler's state (a time budget moves it)
    sched.lr_lambdas[0].total_iters = 7
    again = build_scheduler(build_optimizer(model, cfg.train), cfg.train, total_iters=4)
    again.load_state_dict(sched.state_dict())
    assert again.lr_lambdas[0].total_iters == 7 and again.last_epoch == 4


def test_no_weight_decay_on_norm_and_bias():
    model = TinyDetector()
    groups = param_groups(model, 0.05)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert decayed == {id(model.conv.weight), id(model.head.weight)}
    assert len(groups[1]["params"]) == 4  # conv.bias, norm.weight, norm.bias, head.bias
    cfg = make_cfg(optimizer="adamw", weight_decay=0.05)
    assert isinstance(build_optimizer(model, cfg.train), torch.optim.AdamW)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimizer_steps_as_pytorchs_default_loop(name):
    """The fused kernels build_optimizer picks on a CPU make the updates of PyTorch's per-tensor loop."""
    cfg = make_cfg(optimizer=name, lr=0.01, weight_decay=0.05)
    torch.manual_seed(0)
    model = TinyDetector()
    reference = TinyDetector()
    reference.load_state_dict(model.state_dict())
    ours = build_optimizer(model, cfg.train)
    assert all(g["fused"] for g in ours.param_groups)
    groups = param_groups(reference, 0.05)
    theirs = (
        torch.optim.SGD(groups, lr=0.01, momentum=cfg.train.momentum, foreach=False)
        if name == "sgd" else torch.optim.AdamW(groups, lr=0.01, foreach=False)
    )
    for step in range(5):
        for m, opt in ((model, ours), (reference, theirs)):
            torch.manual_seed(step)
            for p in m.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)


# --------------------------------------------------------------------------------------------------
# the loop


def test_grad_accumulation_equals_the_larger_batch(tmp_path):
    cfg_big = make_cfg(epochs=1)
    cfg_big.data.batch_size = 4
    cfg_acc = make_cfg(epochs=1, grad_accum=2)
    big = make_trainer(tmp_path / "a", cfg_big, evaluator=lambda d, p: {"bbox": {"AP": 0.1}})
    big.fit()
    acc = make_trainer(tmp_path / "b", cfg_acc, evaluator=lambda d, p: {"bbox": {"AP": 0.1}})
    acc.fit()
    assert big.pos.iteration == acc.pos.iteration == 2
    for k, v in weights(big.model).items():
        torch.testing.assert_close(weights(acc.model)[k], v, rtol=0, atol=1e-6)

    def logged_losses(run):
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if r["kind"] == "train"]

    assert logged_losses(tmp_path / "b" / "run") == pytest.approx(logged_losses(tmp_path / "a" / "run"), abs=1e-6)


def test_clip_grad_bounds_the_first_sgd_step(tmp_path):
    cfg = make_cfg(max_iters=1, momentum=0.0, lr=1.0, clip_grad=1e-3)
    tr = make_trainer(tmp_path, cfg)
    before = torch.cat([p.detach().flatten().clone() for p in tr.model.parameters()])
    tr.fit()
    after = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
    assert float((after - before).norm()) == pytest.approx(1e-3, rel=1e-4)


def test_best_checkpoint_follows_box_ap_and_files_are_written(tmp_path):
    aps = iter([0.1, 0.3, 0.2])
    cfg = make_cfg(epochs=3, ckpt_every_iters=1)
    tr = make_trainer(tmp_path, cfg, evaluator=lambda d, p: {"bbox": {"AP": next(aps), "AP50": 0.9}})
    summary = tr.fit()
    run = tmp_path / "run"
    best, last = load_checkpoint_file(run / "best.pt"), load_checkpoint_file(run / "last.pt")
    assert best["iteration"] == 8 and best["metrics"]["bbox"]["AP"] == pytest.approx(0.3)
    # best.pt is for inference and fine-tuning: weights, config and categories, no optimizer state
    assert {"model", "config", "class_names", "categories", "arch"} <= set(best)
    assert not {"optimizer", "scheduler", "rng", "state"} & set(best)
    assert (run / "best.pt").stat().st_size < (run / "last.pt").stat().st_size
    assert last["state"]["iteration"] == 12 and last["state"]["epoch"] == 3
    assert summary["best_score"] == pytest.approx(0.3) and summary["best_iteration"] == 8
    assert {"model", "config", "class_names", "arch", "optimizer", "scheduler", "rng"} <= set(last)
    assert last["class_names"] == ["thing"]
    for k, v in tr.model.state_dict().items():
        assert torch.equal(last["model"][k], v)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert sum('"kind": "train"' in line for line in lines) == 12
    assert sum('"kind": "eval"' in line for line in lines) == 3
    assert (run / "config.yaml").exists() and list((run / "tb").glob("events.out.tfevents.*"))


def test_single_nonfinite_loss_skips_only_that_update(tmp_path, capfd):
    snapshots = {}
    cfg = make_cfg(epochs=1)
    tr = make_trainer(tmp_path, cfg, model=TinyDetector(nan_at=(3,)),
                      hooks=[lambda ev, t: snapshots.update({t.pos.iteration: weights(t.model)}) if ev == "step" else None])
    tr.fit()
    assert tr.pos.iteration == 4
    for k in snapshots[2]:
        assert torch.equal(snapshots[3][k], snapshots[2][k])  # the NaN step changed nothing
    assert not torch.equal(snapshots[4]["head.weight"], snapshots[3]["head.weight"])
    assert "update skipped (1/5 in a row)" in capfd.readouterr().err


def test_repeated_nonfinite_loss_stops_with_last_good_checkpoint(tmp_path):
    cfg = make_cfg(epochs=5, ckpt_every_iters=1, max_bad_steps=3)
    tr = make_trainer(tmp_path, cfg, model=TinyDetector(nan_at=(3, 4, 5, 6)))
    with pytest.raises(TrainingDiverged, match=r"not finite for 3 steps in a row.*last good checkpoint"):
        tr.fit()
    ckpt = load_checkpoint_file(tmp_path / "run" / "last.pt")
    assert ckpt["state"]["iteration"] == 2
    for k, v in tr.model.state_dict().items():
        assert torch.equal(ckpt["model"][k], v)


def test_amp_bfloat16_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr("vision.runtime.precision.cpu_has_native_bf16", lambda: True)  # any CPU can emulate it
    cfg = make_cfg(amp=True, max_iters=2)
    tr = make_trainer(tmp_path, cfg)
    before = weights(tr.model)
    tr.fit()
    assert tr.model.last_dtype == torch.bfloat16  # autocast was on in the forward pass
    assert not tr.scaler.is_enabled()  # bfloat16 needs no loss scaling
    after = weights(tr.model)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not torch.equal(before["conv.weight"], after["conv.weight"])
    assert after["conv.weight"].dtype == torch.float32  # master weights stay float32


def test_channels_last_trains_the_same_weights_and_saves_loadable_ones(tmp_path):
    plain = make_trainer(tmp_path / "a", make_cfg(max_iters=3))
    plain.fit()
    nhwc = make_trainer(tmp_path / "b", make_cfg(max_iters=3, channels_last=True))
    nhwc.fit()
    conv = nhwc.model.conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for k, v in weights(plain.model).items():
        torch.testing.assert_close(weights(nhwc.model)[k], v, rtol=0, atol=1e-5)
    fresh = TinyDetector()
    fresh.load_state_dict(load_checkpoint_file(tmp_path / "b" / "run" / "last.pt")["model"])
    assert fresh.conv.weight.is_contiguous()
    assert torch.equal(fresh.conv.weight, conv.detach())


def test_amp_falls_back_to_float32_without_native_bfloat16(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("vision.runtime.precision.cpu_has_native_bf16", lambda: False)
    tr = make_trainer(tmp_path, make_cfg(amp=True, max_iters=1))
    tr.fit()
    assert tr.model.last_dtype == torch.float32
    assert "no native bfloat16" in capsys.readouterr().err


def test_ema_weights_are_checkpointed_and_restored(tmp_path):
    cfg = make_cfg(ema=True, ema_decay=0.5, ema_warmup=False, max_iters=3, ckpt_every_iters=1)
    tr = make_trainer(tmp_path, cfg)
    tr.fit()
    ckpt = load_checkpoint_file(tmp_path / "run" / "last.pt")
    assert not torch.equal(ckpt["model"]["conv.weight"], ckpt["model_raw"]["conv.weight"])
    other = make_trainer(tmp_path / "other", make_cfg(ema=True, ema_decay=0.5, ema_warmup=False, max_iters=3))
    other.resume(tmp_path / "run" / "last.pt")
    assert torch.equal(other.ema.module.conv.weight, ckpt["model"]["conv.weight"])
    assert torch.equal(other.model.conv.weight, ckpt["model_raw"]["conv.weight"])
    assert other.pos.iteration == 3


def test_freeze_until_an_epoch_then_train(tmp_path):
    snaps = {}
    cfg = make_cfg(epochs=2, freeze="conv", unfreeze_at=1)
    tr = make_trainer(tmp_path, cfg, hooks=[lambda ev, t: snaps.update({t.pos.epoch: weights(t.model)})
                                            if ev in ("start", "epoch") else None])
    tr.fit()
    assert torch.equal(snaps[1]["conv.weight"], snaps[0]["conv.weight"])  # frozen in epoch 1
    assert not torch.equal(snaps[1]["head.weight"], snaps[0]["head.weight"])
    assert not torch.equal(snaps[2]["conv.weight"], snaps[1]["conv.weight"])  # trained in epoch 2


def test_time_budget_ends_training_early(tmp_path):
    cfg = make_cfg(epochs=1000, time_budget_min=1e-9, schedule="cosine")
    tr = make_trainer(tmp_path, cfg)
    summary = tr.fit()
    assert summary["iterations"] < 10  # stopped at the first log once the budget was spent
    assert tr.total_iters == summary["iterations"]


def test_resume_rejects_a_weights_only_checkpoint(tmp_path):
    path = tmp_path / "w.pt"
    atomic_save({"model": TinyDetector().state_dict()}, path)
    tr = make_trainer(tmp_path, make_cfg())
    with pytest.raises(DataError, match="not a training checkpoint"):
        tr.resume(path)


# --------------------------------------------------------------------------------------------------
# atomic checkpoint writes


def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"iteration": 1, "w": torch.ones(1000)}, path)

    def torn_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the write

    monkeypatch.setattr("vision.engine.checkpoint.torch.save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"iteration": 2, "w": torch.zeros(1000)}, path)
    ckpt = load_checkpoint_file(path)
    assert ckpt["iteration"] == 1 and torch.equal(ckpt["w"], torch.ones(1000))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind


def test_sigkill_during_writes_never_leaves_a_broken_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    script = textwrap.dedent(f"""
        import torch
        from vision.engine.checkpoint import atomic_save
        torch.manual_seed(0)
        big = torch.randn(4_000_000)
        i = 0
        while True:
            i += 1
            atomic_save({{"iteration": i, "w": big + i}}, {str(path)!r})
            print(i, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"
        time.sleep(0.05 + np.random.default_rng().uniform(0, 0.3))  # somewhere inside a later write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = load_checkpoint_file(path)  # complete and readable, whichever write it is
    torch.manual_seed(0)
    assert torch.equal(ckpt["w"], torch.randn(4_000_000) + ckpt["iteration"])
    torn = tmp_path / "torn.pt"  # what a plain torch.save killed half-way would leave
    torn.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(DataError, match="not a readable checkpoint"):
        load_checkpoint_file(torn)


def test_loader_workers_start_after_the_parent_used_opencv_threads():
    """Building a data set with OpenCV (threaded resizes) and then training in the same process, as a
    script that makes its data first does: the forked workers must not wait on the parent's pool."""
    script = textwrap.dedent("""
        import cv2, numpy as np, torch
        from torch.utils.data import BatchSampler, SequentialSampler
        from vision.data.loader import make_loader
        big = np.random.rand(1000, 1000).astype(np.float32)
        for _ in range(3):
            cv2.resize(big, (1500, 1500), interpolation=cv2.INTER_CUBIC)  # starts OpenCV's thread pool
        class Resized(torch.utils.data.Dataset):
            def __len__(self):
                return 4
            def __getitem__(self, i):
                return float(cv2.resize(big, (500, 500), interpolation=cv2.INTER_CUBIC).mean())
        loader = make_loader(Resized(), BatchSampler(SequentialSampler(range(4)), 2, False), 2,
                             torch.device("cpu"), 0, list)
        print(sum(len(b) for b in loader))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "4"


# --------------------------------------------------------------------------------------------------
# per-sample seeding of the augmentation pipeline


def test_per_sample_seed_reproduces_augmentation_without_correlating_steps():
    from vision.config import AugmentConfig
    from vision.data.transforms import build_train_transform
    from vision.engine.seeding import seed_transform

    transform = build_train_transform(AugmentConfig(hflip=0.5, vflip=0.5))
    image = np.zeros((8, 8, 3), np.uint8)
    image[0, 0] = 255  # the bright corner tells which flips were applied
    sample = {"image": image, "boxes": np.array([[0, 0, 4, 4]], np.float32), "labels": np.array([1])}

    def corner(seed: int) -> tuple[bool, bool]:
        seed_transform(transform, seed)
        y, x = np.argwhere(transform(dict(sample))["image"][..., 0] == 255)[0]
        return bool(x), bool(y)  # (flipped left-right, flipped up-down)

    draws = [corner(s) for s in range(64)]
    assert draws == [corner(s) for s in range(64)]  # the same seed, the same augmentation
    h = np.array([d[0] for d in draws])
    v = np.array([d[1] for d in draws])
    assert 16 < h.sum() < 48 and 16 < v.sum() < 48
    assert 0 < (h != v).sum() < 64  # the two flips are drawn independently, not from equal seeds


def test_device_selection():
    from vision.errors import ConfigError
    from vision.runtime.device import autocast_dtype, select_device

    assert select_device("cpu") == torch.device("cpu")
    assert autocast_dtype(torch.device("cpu")) == torch.bfloat16
    assert autocast_dtype(torch.device("cuda", 0)) == torch.float16
    if not torch.cuda.is_available():
        assert select_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            select_device("cuda:1")
    with pytest.raises(ConfigError, match="expected auto, cpu, cuda or cuda:N"):
        select_device("gpu")
