"""One training step on dense real images: torchvision's resize and mask targets against the trainer's.

    python bench/bench_dense_step.py                       # MoNuSeg, the 2 densest images, 500²
    python bench/bench_dense_step.py --scale 1.0 --steps 2

The setting of issue 15: R18-FPN from scratch, the two densest MoNuSeg training images
(../shared/data/monuseg/train, 1000×1000, ~1,300–1,900 nuclei each) in one batch, whole images
shown to the model at ``--scale`` (0.5: 500²), AdamW. Both arms share the model class, its
initial weights, the data and the sampled RoIs (128 per image); they differ only where the
trainer differs from torchvision:

- **torchvision**: ``GeneralizedRCNNTransform`` resizes the image so its short side is
  ``1000 × scale``, interpolating every ground-truth mask as a full-size float tensor, and
  torchvision's ``RoIHeads`` cut the 28×28 mask targets from a float copy of all masks;
- **ours**: ``ScaleTransform`` (``models/scale.py``: masks resized box by box, nothing at scale 1)
  and ``MatchedMaskRoIHeads`` (``models/roi_heads.py``: only the matched instances' masks,
  sampled pixel-aligned).

Each arm runs in its own process (so peak RSS is its own): one warm-up step, then ``--steps``
timed steps; seconds per step (median) and the process's peak RSS are printed and, with
``--out``, written as JSON. The 28×28 targets of the two heads differ by design in where they
sample (``aligned=True`` against torchvision's ``aligned=False``, the same work), and so do the
two resizes (nearest vs nearest-exact) at scale ≠ 1.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "monuseg" / "train"


def run_arm(arm: str, data: Path, scale: float, steps: int) -> dict:
    """One arm in this process → its seconds per step and peak RSS."""
    import torch
    from torchvision.models.detection.roi_heads import RoIHeads

    from datasets import build_dataset
    from datasets.statistics import statistics_from_coco
    from engine.config import TrainConfig
    from engine.optim import build_optimizer
    from models import ModelOptions, build_model
    from transforms import build_transforms
    from transforms.preprocess import Preprocessing

    dataset = build_dataset("folder", "train", {"data_path": str(data)},
                            build_transforms("none", True, Preprocessing("percentile", "rgb")))
    counts = statistics_from_coco(dataset.coco_gt()).objects_per_image
    densest = sorted(range(len(dataset)), key=lambda i: -counts[i])[:2]
    batch = [dataset[i] for i in densest]
    images, targets = [b[0] for b in batch], [b[1] for b in batch]
    size = images[0].shape[-1]
    common = dict(anchor_sizes=(10, 20, 40, 80, 160), box_batch_size_per_image=128, head_norm="none",
                  detections_per_img=2800)
    if arm == "torchvision":
        options = ModelOptions(min_size=round(size * scale), max_size=round(size * scale), **common)
    else:
        options = ModelOptions(input_scale=scale, **common)
    torch.manual_seed(0)
    model = build_model("maskrcnn_resnet18_fpn", 1, options)
    if arm == "torchvision":
        model.roi_heads.__class__ = RoIHeads
    model.train()
    optimizer = build_optimizer(model, TrainConfig(opt="adamw", lr=1e-4, weight_decay=0.05))

    def step() -> float:
        start = time.perf_counter()
        loss = sum(model(images, [dict(t) for t in targets]).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    torch.manual_seed(1)
    step()                                  # warm-up: allocator, oneDNN primitive caches
    times = sorted(step() for _ in range(steps))
    return {"arm": arm, "s_per_step": times[len(times) // 2], "steps": steps,
            "instances": [int(len(t["labels"])) for t in targets],
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder layout with images/ and masks/")
    p.add_argument("--scale", type=float, default=0.5, help="model input scale of the 1000² images")
    p.add_argument("--steps", type=int, default=3, help="timed steps per arm (after one warm-up step)")
    p.add_argument("--arm", choices=("torchvision", "ours"), help=argparse.SUPPRESS)   # the child process
    p.add_argument("--out", type=Path, help="JSON record of both arms")
    args = p.parse_args(argv)
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.data, args.scale, args.steps)))
        return 0
    if not (args.data / "images").is_dir():
        p.error(f"--data {args.data}: no images/ folder (the MoNuSeg training set is ../shared/data/monuseg/train)")
    rows = []
    for arm in ("ours", "torchvision"):
        out = subprocess.run([sys.executable, __file__, "--arm", arm, "--data", str(args.data), "--scale",
                              str(args.scale), "--steps", str(args.steps)], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{arm:12s} {r['s_per_step']:7.2f} s/step  peak RSS {r['peak_rss_gib']:5.2f} GiB  "
              f"instances {r['instances']}", flush=True)
    ours, tv = rows
    print(f"ours / torchvision: {ours['s_per_step'] / tv['s_per_step']:.2f}× the time, "
          f"{ours['peak_rss_gib'] / tv['peak_rss_gib']:.2f}× the peak RSS")
    if args.out:
        from bench.bench_train import cpu_name
        record = {"benchmark": "dense_step", "scale": args.scale, "cpu": cpu_name(),
                  "cpu_count": os.cpu_count(), "arms": rows}
        args.out.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
