"""``torchrun --nproc_per_node 2`` on CPU (gloo): ranks stay in step and only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import yaml

from vision.data.synthetic import make_synthetic_dataset
from vision.engine.checkpoint import load_checkpoint_file

RECIPE = {
    "name": "ddp",
    "model": {
        "arch": "retinanet", "backbone": "test_resnet", "fpn_channels": 16, "min_size": [64], "max_size": 64,
        "anchor_sizes": [[8], [16], [32], [48], [64]], "aspect_ratios": [1.0],
    },
    "data": {
        "root": "", "train": {"ann": "train.json", "images": "images"},
        "val": {"ann": "val.json", "images": "images"}, "batch_size": 1, "num_workers": 0,
        "augment": {"hflip": 0.5},
    },
    "train": {
        "device": "cpu", "seed": 0, "epochs": 1, "optimizer": "sgd", "lr": 0.02, "warmup_iters": 1,
        "eval_every": 1, "ckpt_every_iters": 1, "log_every": 1,
    },
}

# Test-side instrumentation: each rank records its sampler shard, its weights after the first step,
# and every checkpoint it writes.
DRIVER = textwrap.dedent("""
    import json, os, sys
    import torch
    import vision.engine.trainer as T
    from vision.tasks.training import train
    from vision.config import load_config

    out = sys.argv[2]
    rank = int(os.environ["RANK"])
    real_save = T.atomic_save

    def counting_save(obj, path):
        with open(os.path.join(out, f"saves.rank{rank}"), "a") as f:
            f.write(str(path) + "\\n")
        real_save(obj, path)

    T.atomic_save = counting_save

    def hook(event, tr):
        if event == "start":
            s = tr.positions.sampler
            json.dump({"rank": s.rank, "replicas": s.num_replicas, "world": tr.dist.world_size,
                       "share": list(map(int, s))}, open(os.path.join(out, f"sampler.rank{rank}.json"), "w"))
        if event in ("start", "step") and tr.pos.iteration <= 1:
            # parameters; BatchNorm statistics are per rank until DDP broadcasts rank 0's next forward
            state = {k: v.detach().clone() for k, v in tr.model.named_parameters()}
            torch.save(state, os.path.join(out, f"weights.rank{rank}.iter{tr.pos.iteration}.pt"))

    cfg = load_config(sys.argv[1])
    summary = train(cfg, os.path.join(out, "run"), hooks=[hook])
    T.du.cleanup()
    print("summary", rank, summary["iterations"], flush=True)
""")


def test_torchrun_two_ranks_gloo(tmp_path: Path):
    data = tmp_path / "data"
    make_synthetic_dataset(data, num_train=4, num_val=2, image_size=(64, 64), classes=2, max_objects=2,
                           min_object_size=12, seed=1)
    recipe = json.loads(json.dumps(RECIPE))
    recipe["data"]["root"] = str(data)
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(yaml.safe_dump(recipe))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(driver), str(cfg), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "summary 0 2" in proc.stdout and "summary 1 2" in proc.stdout  # 4 images / 2 ranks / batch 1

    # the sampler is sharded: each rank sees its own half of the epoch
    shares = [json.loads((tmp_path / f"sampler.rank{r}.json").read_text()) for r in (0, 1)]
    assert [(s["rank"], s["replicas"], s["world"]) for s in shares] == [(0, 2, 2), (1, 2, 2)]
    assert sorted(shares[0]["share"] + shares[1]["share"]) == [0, 1, 2, 3]

    # identical weights on both ranks after a step, and the step did change them
    before = torch.load(tmp_path / "weights.rank0.iter0.pt", weights_only=True)
    w0 = torch.load(tmp_path / "weights.rank0.iter1.pt", weights_only=True)
    w1 = torch.load(tmp_path / "weights.rank1.iter1.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any(not torch.equal(w0[k], before[k]) for k in w0)

    # checkpoints are written once, by rank 0: iteration 1 (mid-epoch), the epoch end before its
    # evaluation (which cannot then lose it), and after it, with best.pt
    run = tmp_path / "run"
    assert not (tmp_path / "saves.rank1").exists()
    assert (tmp_path / "saves.rank0").read_text().splitlines() == [str(run / n) for n in ("last.pt", "last.pt", "last.pt", "best.pt")]
    ckpt = load_checkpoint_file(run / "last.pt")
    assert ckpt["state"]["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert (run / "best.pt").exists() and len((run / "metrics.jsonl").read_text().splitlines()) == 3
