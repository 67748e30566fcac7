"""Speed: vision's inference engine and training loop against torchvision on the same weights and images.

Usage:
    python benchmarks/speed.py [--part inference training] [--arch retinanet faster_rcnn mask_rcnn]
        [--data ../shared/data/bccd] [--rounds 2] [--train-steps 30] [--bf16] [--no-compile]
        [--retain-for-reference]

Inference: torchvision's ``*_resnet50_fpn`` (random weights, batch-norm statistics set as a trained
network has them, frozen as torchvision's pretrained detectors keep them) against vision's model loaded
with the very same state_dict and run by the inference engine (``Predictor``: folded batch norms,
channels_last, one image per pass on a CPU; then also with ``--compile``: backbone and dense heads
through inductor, the compile in the untimed warm-up pass), both at 800 px on the short side, under
``torch.inference_mode``.  Batch 1 is eight calls of one image; batch 8 one call of eight images.  Each
line gives images/s of both, peak memory in use above the starting point, the largest score
difference over the matched top detections, and the ratio, vision / torchvision.  ``--bf16`` adds the
engine in bfloat16 (CPUs with native bfloat16 only).

Order matters because one setting is process-wide: vision keeps freed host memory for reuse (glibc
``mallopt``, ``vision/engine/host_memory.py``), and nothing undoes that.  So every torchvision
measurement runs first, in the process's default state, as a torchvision user's script runs, and
vision's after it.  Memory is therefore counted as bytes malloc has handed out (``mallinfo2``), not
resident pages, which a retained heap keeps high.  ``--retain-for-reference`` gives torchvision the
same allocator setting, to separate the two effects.

Training: the BCCD recipe's model (``configs/bccd_faster_rcnn.yaml``, hflip only for both) trained for
``--train-steps`` steps by vision's trainer and by a loop written as torchvision's
``references/detection`` (PIL decoding, ``train_one_epoch``: SGD, warmup, a ``loss.item()`` each
step); images/s after the first steps, ratio vision / reference.  The recipe trains with ``train.amp``
(bfloat16 autocast on CPUs that run bfloat16 natively, float32 elsewhere; the reference loop's own
``--amp`` is CUDA autocast and changes nothing on a CPU); a second line gives vision in the other
precision.

Achieved GFLOP/s (the model's FLOPs per image times images/s, counted by torch's FlopCounterMode) is
given against the fastest float32 convolution this machine runs (measured here, as its practical peak).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import math
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from vision.data.records import Categories  # noqa: E402

MIN_SIZE, MAX_SIZE = 800, 1333


class PeakMemory:
    """Peak memory in use (MiB) above the level at entry, sampled every 5 ms: malloc's bytes in use
    where glibc tells them, else resident memory from /proc."""

    def __enter__(self) -> PeakMemory:
        self.base = self.peak = _in_use_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _in_use_mib())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _in_use_mib())

    @property
    def above_base(self) -> float:
        return self.peak - self.base


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


def _in_use_mib() -> float:
    if _MALLINFO2 is not None:
        info = _MALLINFO2()
        return (info.uordblks + info.hblkhd) / 2**20  # heap chunks in use + mmap-served blocks
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def load_images(folder: str | None, n: int) -> list[torch.Tensor]:
    """``n`` uint8 CHW images: BCCD photographs when the folder exists, else smooth random 640x480 ones."""
    from vision.data.image_io import read_image

    if folder and Path(folder).is_dir():
        paths = sorted(Path(folder).glob("*.jpg"))[:n]
        if len(paths) == n:
            return [torch.from_numpy(read_image(str(p))).permute(2, 0, 1).contiguous() for p in paths]
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        low = torch.rand(3, 30, 40, generator=g)
        img = torch.nn.functional.interpolate(low[None], size=(480, 640), mode="bilinear", align_corners=False)[0]
        out.append((img * 255).to(torch.uint8))
    return out


def torchvision_model(arch: str) -> torch.nn.Module:
    """torchvision's detector with frozen batch norms holding trained-looking statistics."""
    from torchvision.models.detection import (
        fasterrcnn_resnet50_fpn,
        maskrcnn_resnet50_fpn,
        retinanet_resnet50_fpn,
    )
    from torchvision.ops.misc import FrozenBatchNorm2d

    factory = {"retinanet": retinanet_resnet50_fpn, "faster_rcnn": fasterrcnn_resnet50_fpn,
               "mask_rcnn": maskrcnn_resnet50_fpn}[arch]
    torch.manual_seed(0)
    model = factory(weights=None, weights_backbone=None, min_size=MIN_SIZE, max_size=MAX_SIZE)
    g = torch.Generator().manual_seed(1)
    body = model.backbone.body
    for name, m in list(body.named_modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(m.num_features)
            frozen.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            frozen.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            frozen.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)
            frozen.bias.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
            parent, _, child = name.rpartition(".")
            setattr(body.get_submodule(parent) if parent else body, child, frozen)
    with torch.no_grad():  # separated scores, so that the detections compared are real ones
        if arch == "retinanet":
            for conv in model.head.classification_head.modules():
                if isinstance(conv, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(conv.weight)
        else:
            model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.05)
            model.roi_heads.box_predictor.cls_score.bias.normal_(0, 2.0, generator=g)
    return model.eval()


def vision_model(arch: str, state_dict: dict) -> torch.nn.Module:
    from vision.config import ModelConfig
    from vision.models import build_model
    from vision.models.weights import load_model_weights

    ours = build_model(ModelConfig(arch=arch, backbone="resnet50", num_classes=90, frozen_bn=True,
                                   min_size=[MIN_SIZE], max_size=MAX_SIZE))
    load_model_weights(ours, state_dict, strict=True)
    return ours.eval()


def score_gap(ours: list[dict], ref: list[dict], top: int = 20) -> tuple[float, int, int]:
    """Over ``ref``'s top detections: the largest score difference of those found in ``ours`` (same label,
    box within a pixel), how many were found, and how many were looked for."""
    worst, found, wanted = 0.0, 0, 0
    for o, r in zip(ours, ref):
        for k in range(min(top, len(r["scores"]))):
            wanted += 1
            same = (o["labels"] == r["labels"][k]) & ((o["boxes"] - r["boxes"][k]).abs().amax(dim=1) <= 1.0)
            if bool(same.any()):
                found += 1
                worst = max(worst, float((o["scores"][same] - r["scores"][k]).abs().min()))
    return worst, found, wanted


def time_calls(fn, batches: list[list[torch.Tensor]], rounds: int) -> tuple[float, float, list]:
    """Best images/s over ``rounds`` (after one warm-up pass), peak memory (warm-up included), and the
    last outputs."""
    best = 0.0
    n = sum(len(b) for b in batches)
    with PeakMemory() as mem:
        outputs = [o for b in batches for o in fn(b)]
        for _ in range(rounds):
            t = time.perf_counter()
            outputs = [o for b in batches for o in fn(b)]
            best = max(best, n / (time.perf_counter() - t))
    return best, mem.above_base, outputs


def flops_per_image(model: torch.nn.Module, image: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model([image.float() / 255])
    return counter.get_total_flops()


def conv_peak_gflops() -> float:
    """The fastest float32 3x3 convolution (256 channels, NHWC) here: the machine's practical peak."""
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 256, 100, 136).contiguous(memory_format=torch.channels_last)
    best = math.inf
    with torch.inference_mode():
        conv(x)
        for _ in range(5):
            t = time.perf_counter()
            conv(x)
            best = min(best, time.perf_counter() - t)
    return 100 * 136 * 256 * 256 * 9 * 2 / best / 1e9


def batches_of(images: list[torch.Tensor]) -> dict[int, list[list[torch.Tensor]]]:
    return {bs: [images[i : i + bs] for i in range(0, len(images), bs)] for bs in (1, min(8, len(images)))}


def bench_reference(arch: str, images: list[torch.Tensor], rounds: int) -> dict:
    """torchvision's model at each batch size: images/s, memory, outputs; also its FLOPs per image."""
    reference = torchvision_model(arch)

    @torch.inference_mode()
    def run_reference(batch: list[torch.Tensor]) -> list[dict]:
        return reference([img.float() / 255 for img in batch])

    runs = {bs: time_calls(run_reference, batches, rounds) for bs, batches in batches_of(images).items()}
    return {"state_dict": reference.state_dict(), "gflop": flops_per_image(reference, images[0]) / 1e9, "runs": runs}


def bench_inference(arch: str, images: list[torch.Tensor], rounds: int, bf16: bool, compile_too: bool,
                    peak: float, ref: dict) -> dict[str, float]:
    """vision's engine against the torchvision figures in ``ref``: one line per batch size and precision;
    returns the float32 ratios by batch size."""
    from vision.inference.engine import EngineOptions
    from vision.inference.predictor import Predictor
    from vision.runtime.precision import cpu_has_native_bf16

    cats = Categories(tuple(range(1, 91)), tuple(str(i) for i in range(1, 91)))
    engines = {"fp32": Predictor(vision_model(arch, ref["state_dict"]), cats, device="cpu", engine=EngineOptions())}
    if compile_too:
        engines["fp32 compiled"] = Predictor(vision_model(arch, ref["state_dict"]), cats, device="cpu",
                                             engine=EngineOptions(compile=True))
    if bf16 and cpu_has_native_bf16():
        engines["bf16"] = Predictor(vision_model(arch, ref["state_dict"]), cats, device="cpu",
                                    engine=EngineOptions(precision="bf16"))
    gflop = ref["gflop"]
    ratios = {}
    for bs, batches in batches_of(images).items():
        ref_ips, ref_mem, ref_out = ref["runs"][bs]
        for name, predictor in engines.items():
            ips, mem, out = time_calls(predictor.predict, batches, rounds)
            gap, found, wanted = score_gap(out, [_drop_background(o) for o in ref_out])
            print(f"inference {arch} batch {bs} {name}: torchvision {ref_ips:.3f} img/s ({ref_mem:.0f} MiB, "
                  f"{gflop * ref_ips:.0f} GFLOP/s) | vision {ips:.3f} img/s ({mem:.0f} MiB, {gflop * ips:.0f} "
                  f"GFLOP/s, top detections found {found}/{wanted}, max score diff {gap:.1e}) | peak {peak:.0f} GFLOP/s | ratio {ips / ref_ips:.2f}",
                  flush=True)
            if name.startswith("fp32"):
                ratios[f"{arch} b{bs}{name[4:]}"] = ips / ref_ips
    return ratios


def _drop_background(pred: dict) -> dict:
    keep = pred["labels"] > 0
    return {k: v[keep] for k, v in pred.items()}


class ReferenceDataset(torch.utils.data.Dataset):
    """As torchvision's references/detection read data: PIL decoding, PILToTensor, ToDtype, hflip."""

    def __init__(self, records):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        import torchvision.transforms.v2.functional as F
        from PIL import Image
        from torchvision import tv_tensors

        r = self.records[i]
        image = F.pil_to_tensor(Image.open(r.path).convert("RGB"))
        boxes = tv_tensors.BoundingBoxes(torch.as_tensor(r.boxes, dtype=torch.float32), format="XYXY",
                                         canvas_size=image.shape[-2:])
        if torch.rand(1) < 0.5:
            image, boxes = F.horizontal_flip(image), F.horizontal_flip(boxes)
        image = F.to_dtype(image, torch.float32, scale=True)
        return image, {"boxes": boxes.as_subclass(torch.Tensor), "labels": torch.as_tensor(r.labels, dtype=torch.int64)}


def reference_training(cfg, steps: int, skip: int) -> float:
    """images/s of a ``references/detection``-style loop on the config's model and training images."""
    from vision.data.build import build_datasets
    from vision.models import build_model

    torch.manual_seed(0)
    train_set = build_datasets(cfg)[0]
    records = [r for r in train_set.records if len(r.boxes)]
    cfg.model.num_classes = len(train_set.categories)
    model = build_model(cfg.model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum,
                                weight_decay=cfg.train.weight_decay)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.001, total_iters=cfg.train.warmup_iters)
    loader = torch.utils.data.DataLoader(
        ReferenceDataset(records), batch_size=cfg.data.batch_size, shuffle=True,
        num_workers=cfg.data.num_workers, collate_fn=lambda b: tuple(zip(*b)),
    )
    done, t0 = 0, None
    while done < steps:
        for images, targets in loader:
            if done == skip:
                t0 = time.perf_counter()
            loss_dict = model(list(images), list(targets))
            losses = sum(loss for loss in loss_dict.values())
            loss_value = losses.item()  # the reference logs and checks it every step
            if not math.isfinite(loss_value):
                raise RuntimeError(f"loss is {loss_value}")
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()
            warmup.step()
            done += 1
            if done >= steps:
                break
    return (steps - skip) * cfg.data.batch_size / (time.perf_counter() - t0)


def vision_training(cfg, steps: int, skip: int, out: Path) -> float:
    from vision.tasks.training import train

    marks: dict[str, float] = {}

    def clock(event: str, trainer) -> None:
        if event == "step" and trainer.pos.iteration == skip:
            marks["start"] = time.perf_counter()
        if event == "step" and trainer.pos.iteration == steps:
            marks["end"] = time.perf_counter()

    train(cfg, out, hooks=[clock])
    return (steps - skip) * cfg.data.batch_size / (marks["end"] - marks["start"])


def training_config(data: str, steps: int, out: Path):
    """The BCCD recipe for ``steps`` steps, hflip only, evaluated on one test image."""
    from vision.config import load_config

    test_ids = (out / "one_test_image.txt").resolve()  # relative ids paths are read under data.root
    out.mkdir(parents=True, exist_ok=True)
    test_ids.write_text((Path(data) / "ImageSets" / "Main" / "test.txt").read_text().split()[0] + "\n")
    return load_config(ROOT / "configs" / "bccd_faster_rcnn.yaml", [
        f"data.root={data}", f"train.max_iters={steps}", "train.time_budget_min=null", "train.epochs=1000",
        "data.augment.vflip=0", "data.augment.rotate90=0", "data.augment.color_jitter=0",
        "train.ckpt_every_iters=0", "train.log_every=1000", f"data.val.ids={test_ids}", f"output_dir={out}",
    ])


def report_training(cfg, steps: int, skip: int, ref: float, ours: float) -> float:
    print(f"training bccd_faster_rcnn{' amp' if cfg.train.amp else ''} ({steps - skip} timed steps, batch "
          f"{cfg.data.batch_size}): reference loop {ref:.2f} img/s | vision {ours:.2f} img/s | ratio {ours / ref:.2f}", flush=True)
    return ours / ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", default=["inference", "training"], choices=["inference", "training"])
    parser.add_argument("--arch", nargs="+", default=["retinanet", "faster_rcnn", "mask_rcnn"])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "bccd"))
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds after the warm-up (best is kept)")
    parser.add_argument("--num-images", type=int, default=8, help="images per timed round (a multiple of 8)")
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--bf16", action="store_true", help="also the engine in bfloat16")
    parser.add_argument("--no-compile", action="store_true", help="leave out the engine with --compile")
    parser.add_argument("--out", default="runs/bench_speed")
    parser.add_argument("--retain-for-reference", action="store_true",
                        help="torchvision too keeps freed host memory (vision's allocator setting for both)")
    args = parser.parse_args()
    if args.retain_for_reference:
        from vision.runtime.host_memory import retain_freed_memory

        print(f"allocator setting for both: {retain_freed_memory()}", flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}", flush=True)
    if "training" in args.part and not (Path(args.data) / "ImageSets" / "Main" / "test.txt").is_file():
        parser.error(f"--data {args.data}: not the BCCD folder (no ImageSets/Main/test.txt); training needs it")
    ratios: dict[str, float] = {}
    steps, skip = args.train_steps, min(5, args.train_steps // 3)
    train_cfg = training_config(args.data, steps, Path(args.out)) if "training" in args.part else None
    # every torchvision measurement before any of vision's: vision's allocator setting is for good
    ref_training = reference_training(copy.deepcopy(train_cfg), steps, skip) if train_cfg else None
    refs: dict[str, dict] = {}
    if "inference" in args.part:
        images = load_images(str(Path(args.data) / "JPEGImages"), args.num_images)
        peak = conv_peak_gflops()
        refs = {arch: bench_reference(arch, images, args.rounds) for arch in args.arch}
    # vision's training before its inference: the data loader forks its workers, and a fork after
    # torch.compile (whose compile pool holds locks) can leave the workers waiting on a lock forever
    if train_cfg is not None:
        ours = vision_training(copy.deepcopy(train_cfg), steps, skip, Path(args.out) / "vision")
        ratios["training"] = report_training(train_cfg, steps, skip, ref_training, ours)
        other = copy.deepcopy(train_cfg)  # the other precision too; the recipe's figure is the one that counts
        other.train.amp = not train_cfg.train.amp
        ours = vision_training(other, steps, skip, Path(args.out) / "vision_other_precision")
        ratios[f"training (train.amp={str(other.train.amp).lower()})"] = report_training(other, steps, skip,
                                                                                          ref_training, ours)
    for arch, ref in refs.items():
        ratios.update(bench_inference(arch, images, args.rounds, args.bf16, not args.no_compile, peak, ref))
    print("ratio vision / torchvision: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
