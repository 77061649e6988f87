"""Training throughput: this trainer against a plain torchvision-references loop, same model class and data.

    python bench/bench_train.py                           # the quick start's data: 192 steps per arm
    python bench/bench_train.py --steps 96 --ablation-rounds 4
    python bench/bench_train.py --steps 40 -- --dataset folder --data-path ../shared/data/monuseg/train

Flags after ``--`` are train.py's data flags; both arms train on that data.

- **torchvision**: a loop written the way torchvision's detection references train — the model
  class the trainer would pick (R18-FPN on CPU), with torchvision's defaults for everything the
  trainer changes: the model transform resizes each image so its short side is 800, anchors
  32–512, 512 RoIs sampled per image, RPN top-k 2000, 100 detections; random horizontal flip
  only; SGD lr 0.02, momentum 0.9, weight decay 1e-4, linear warm-up over min(1000, epoch length
  − 1) steps, decays at 16/26 and 22/26 of the epochs; PyTorch's default (per-tensor) optimizer
  kernels; stops at the first non-finite loss, as the references do. ``--torchvision-lr``:
  another SGD rate (0.02 is the references' for 16 images per batch; the linear scaling rule
  gives 0.005 for 4).
- **ours**: ``train.py`` itself with the same data flags and an epoch count giving the same
  number of steps, through the real trainer (data sizes, preset, schedule, fused optimizer, and
  bf16 autocast on a CPU with bf16 units, AMX or AVX-512 BF16; ``-- --no-amp`` for fp32).

Both are scored on the validation split with the same maxDets (the trainer's). Images/s counts
training steps only (from the first to the last step, data waits included; evaluation excluded).

The ablation times one fixed batch through the torchvision configuration with the trainer's
changes added one at a time (native scale from the data, fewer sampled RoIs, RPN top-k, mask targets
from the matched instances (pixel-aligned), banded anchor matching, BatchNorm in the FPN and mask head, the optimizer, its fused
kernels, RoIAlign by gather (``models/pooling.py``), channels-last weights, and bf16 autocast where train.py turns it on: CPUs with AMX or AVX-512 BF16); variants run interleaved, round after round, so a machine that slows down slows all.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

TORCHVISION_OPTIONS = dict(min_size=800, max_size=1333, input_scale=None, anchor_sizes=(32, 64, 128, 256, 512),
                           detections_per_img=100, rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=2000,
                           rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=1000,
                           box_batch_size_per_image=512, head_norm="none")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        cut = argv.index("--")
        argv, train_flags = argv[:cut], argv[cut + 1:]
    else:
        train_flags = []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per arm (default: one run of the trainer's defaults for the data)")
    p.add_argument("--ablation-rounds", type=int, default=3, help="timed steps per ablation variant (0: no ablation)")
    p.add_argument("--skip-training", action="store_true", help="only the ablation")
    p.add_argument("--work-dir", default=None, help="where the trainer's run goes (default: a temporary folder)")
    p.add_argument("--out", default=None, help="JSON record of the results")
    p.add_argument("--torchvision-lr", type=float, default=0.02,
                   help="the plain loop's SGD learning rate (torchvision's references: 0.02; from scratch on the "
                        "quick start's data it diverges within 20 steps)")
    return p.parse_args(argv), train_flags


def trainer_config(train_flags: list[str]):
    """The trainer's resolved config for these data flags, and its training set (no transforms)."""
    import train
    from datasets import build_dataset

    args = train.get_args_parser().parse_args(train_flags)
    config = train.config_from_args(args)
    options = config.data_options()
    train_set = build_dataset(config.dataset, "train", options, None)
    config = train.resolve_from_data(config, train.pinned_options(args), train_set)
    return config, options


def torchvision_model(config, num_classes: int, matched_mask_targets: bool = False, banded_matching: bool = False,
                      gather_roi_align: bool = False, channels_last: bool = False, **changes):
    """The trainer's model class with torchvision's settings, ``changes`` applied; torchvision's
    own ``RoIHeads`` unless ``matched_mask_targets`` (``models/roi_heads.py``), its own RPN
    unless ``banded_matching`` (``models/rpn.py``), its own RoI poolers unless
    ``gather_roi_align`` (``models/pooling.py``), contiguous weights unless ``channels_last``."""
    import dataclasses

    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.rpn import RegionProposalNetwork
    from torchvision.ops import MultiScaleRoIAlign

    from models.zoo import ModelOptions, assemble_model
    options = dataclasses.replace(ModelOptions(), **{**TORCHVISION_OPTIONS, **changes})
    model = assemble_model(config.model, num_classes, options, pretrained=False)
    if not matched_mask_targets:
        model.roi_heads.__class__ = RoIHeads
    if not banded_matching:
        model.rpn.__class__ = RegionProposalNetwork
    if not gather_roi_align:
        for pooler in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
            pooler.__class__ = MultiScaleRoIAlign
    if not channels_last:
        model = model.to(memory_format=torch.contiguous_format)
    return model


def references_schedule(optimizer, steps: int, iters_per_epoch: int):
    """torchvision references: linear warm-up over min(1000, epoch length - 1) steps of the first
    epoch from factor 0.001, MultiStepLR at epochs 16 and 22 of 26, scaled to this run's epochs."""
    warmup = max(1, min(1000, iters_per_epoch - 1))
    epochs = max(1, math.ceil(steps / iters_per_epoch))
    milestones = [round(epochs * 16 / 26) * iters_per_epoch, round(epochs * 22 / 26) * iters_per_epoch]

    def factor(step: int) -> float:
        f = 0.001 + (1 - 0.001) * min(step, warmup) / warmup if step < warmup else 1.0
        return f * 0.1 ** sum(step >= m for m in milestones)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run_torchvision_loop(config, options: dict, steps: int, lr: float = 0.02) -> dict:
    """The plain loop: train ``steps`` steps, then evaluate with the trainer's evaluator. As the
    references do, it stops at the first non-finite loss (``diverged_at``: that step; no scores)."""
    from datasets import build_dataset
    from engine.data import collate, eval_loader
    from engine.evaluation import evaluate_model, headline
    from transforms import build_transforms
    from transforms.preprocess import Preprocessing

    contract = Preprocessing.from_config(config.to_dict())
    train_set = build_dataset(config.dataset, "train", options, build_transforms("hflip", True, contract))
    val_set = build_dataset(config.dataset, "val", options, build_transforms("none", False, contract))
    torch.manual_seed(config.seed)
    model = torchvision_model(config, len(train_set.class_names) + 1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(train_set), config.batch_size,
                                            drop_last=True)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=config.workers,
                                         collate_fn=collate)
    scheduler = references_schedule(optimizer, steps, len(loader))
    model.train()
    step, losses, first_done, last_done, diverged_at = 0, [], None, None, None
    while step < steps and diverged_at is None:
        for images, targets in loader:
            loss = sum(model(images, targets).values())
            if not math.isfinite(loss.item()):      # torchvision's references: "Loss is nan, stopping training"
                diverged_at = step + 1
                print(f"  torchvision loop: loss {loss.item()} at step {diverged_at}, stopping as the references do",
                      flush=True)
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(loss.item())
            now = time.perf_counter()
            first_done = now if first_done is None else first_done
            last_done = now
            if step % 10 == 0 or step == steps:
                print(f"  torchvision loop: step {step}/{steps}  loss {losses[-1]:.3f}", flush=True)
            if step >= steps:
                break
    scores = {k: None for k in ("segm_AP", "segm_AP50", "sartorius", "bbox_AP")}
    if diverged_at is None:
        report, _ = evaluate_model(model, eval_loader(val_set, config.batch_size, config.workers), val_set.coco_gt(),
                                   torch.device("cpu"), config.detections_per_img, class_names=list(train_set.class_names))
        scores = {k: headline(report).get(k) for k in scores}
    done = len(losses)
    images_per_s = (done - 1) * config.batch_size / (last_done - first_done) if done > 1 else float("nan")
    return {"steps": done, "lr": lr, "diverged_at": diverged_at, "images_per_s": images_per_s,
            "final_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1), **scores}


def run_ours(train_flags: list[str], steps: int | None, iters_per_epoch: int, work_dir: Path) -> dict:
    """train.py in this process, for ``steps`` steps (whole epochs), evaluated once at the end."""
    import train
    from engine.evaluation import headline

    flags = [*train_flags, "--output-dir", str(work_dir), "--name", "ours", "--eval-every", "0"]
    if steps is not None:
        flags += ["--epochs", str(max(1, math.ceil(steps / iters_per_epoch)))]
    report = train.main(train.get_args_parser().parse_args(flags))
    records = [json.loads(line) for line in (work_dir / "ours" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r.get("type") == "train"]
    first, last = train_records[0], train_records[-1]
    batch = json.loads((work_dir / "ours" / "config.json").read_text())["batch_size"]
    images_per_s = (last["step"] - first["step"]) * batch / (last["time"] - first["time"])
    losses = [r["loss"] for r in train_records[-3:]]
    return {"steps": last["step"], "images_per_s": images_per_s, "final_loss": sum(losses) / len(losses),
            **{k: headline(report).get(k) for k in ("segm_AP", "segm_AP50", "sartorius", "bbox_AP")}}


def ablation(config, options: dict, rounds: int) -> list[dict]:
    """Seconds per step on one fixed batch, the trainer's changes added one at a time."""
    import dataclasses

    from datasets import build_dataset
    from engine.evaluation import autocast_context
    from engine.optim import build_optimizer
    from transforms import build_transforms
    from transforms.preprocess import Preprocessing

    contract = Preprocessing.from_config(config.to_dict())
    dataset = build_dataset(config.dataset, "train", options, build_transforms("hflip", True, contract))
    batch = [dataset[i % len(dataset)] for i in range(config.batch_size)]
    images, targets = [b[0] for b in batch], [b[1] for b in batch]
    num_classes = len(dataset.class_names) + 1
    native = ({"input_scale": config.input_scale} if config.input_scale is not None else
              {"min_size": config.min_size, "max_size": config.max_size})
    steps = [
        ("torchvision defaults", {}, False),
        ("+ trainer's input size (scale from the data)", {**native, "anchor_sizes": config.anchor_sizes}, False),
        (f"+ {config.box_batch_size_per_image} sampled RoIs (not 512)",
         {"box_batch_size_per_image": config.box_batch_size_per_image}, False),
        (f"+ RPN top-k {config.rpn_pre_nms_top_n_train} in training",
         {"rpn_pre_nms_top_n_train": config.rpn_pre_nms_top_n_train,
          "rpn_post_nms_top_n_train": config.rpn_post_nms_top_n_train}, False),
        ("+ mask targets from the matched instances only, pixel-aligned, gathered from uint8",
         {"matched_mask_targets": True}, False),
        ("+ anchor matching band by band", {"banded_matching": True}, False),
        (f"+ --head-norm {config.head_norm} (FPN and mask head)", {"head_norm": config.head_norm}, False),
        (f"+ the trainer's optimizer ({config.opt}), per-tensor kernels", {}, "plain"),
        ("+ fused optimizer kernels", {}, "fused"),
        ("+ RoIAlign by gather and scatter-add in training", {"gather_roi_align": True}, "fused"),
        ("+ channels-last weights", {"channels_last": True}, "fused"),
    ]
    if config.amp:   # train.py's default on a CPU with bf16 units (engine.config.cpu_has_fast_bf16)
        steps.append(("+ bf16 autocast (the default on CPUs with bf16 units)", {}, "fused+amp"))
    variants, changes = [], {}
    for name, change, optimizer in steps:
        changes = {**changes, **change}
        torch.manual_seed(0)
        model = torchvision_model(config, num_classes, **changes)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        if optimizer is False:      # the references' SGD
            opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)
        else:                       # the trainer's, at a small lr: only the time of a step matters here
            opt = build_optimizer(model, dataclasses.replace(config, lr=1e-5))
            if optimizer == "plain":
                for group in opt.param_groups:
                    group.update(fused=None, foreach=False)
        variants.append({"name": name, "model": model, "opt": opt, "times": [], "amp": optimizer == "fused+amp"})

    def one_step(v: dict) -> float:
        start = time.perf_counter()
        with autocast_context(torch.device("cpu"), v["amp"]):
            loss = sum(v["model"](images, targets).values())
        v["opt"].zero_grad()
        loss.backward()
        v["opt"].step()
        return time.perf_counter() - start

    for v in variants:          # warm-up: allocator, oneDNN primitive caches
        one_step(v)
    for r in range(rounds):
        for v in variants:
            v["times"].append(one_step(v))
        print(f"  ablation round {r + 1}/{rounds}: " + "  ".join(f"{v['times'][-1]:.2f}" for v in variants), flush=True)
    out, previous = [], None
    for v in variants:
        seconds = sorted(v["times"])[len(v["times"]) // 2]   # median
        out.append({"variant": v["name"], "s_per_step": seconds,
                    "speedup_vs_previous": (previous / seconds) if previous else 1.0})
        previous = seconds
    base = out[0]["s_per_step"]
    for row in out:
        row["speedup_vs_torchvision"] = base / row["s_per_step"]
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    args, train_flags = parse_args(sys.argv[1:] if argv is None else argv)
    from engine.data import TrainBatchSampler, aspect_ratio_groups

    config, options = trainer_config(train_flags)
    from datasets import build_dataset
    train_set = build_dataset(config.dataset, "train", options, None)
    sampler = TrainBatchSampler(aspect_ratio_groups([train_set.get_image_size(i) for i in range(len(train_set))],
                                                    config.aspect_ratio_group_factor),
                                config.batch_size, config.seed, min_batches=config.min_epoch_iters)
    iters_per_epoch = len(sampler)
    steps = args.steps or (config.epochs or 26) * iters_per_epoch
    steps = max(1, math.ceil(steps / iters_per_epoch)) * iters_per_epoch   # whole epochs for the trainer
    record = {"benchmark": "bench_train", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": cpu_name(),
              "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "train_flags": train_flags,
              "model": config.model, "batch_size": config.batch_size, "steps": steps}
    print(f"{config.model}, batch {config.batch_size}, {steps} steps per arm, {cpu_name()}, "
          f"{torch.get_num_threads()} threads", flush=True)

    if args.ablation_rounds > 0:
        rows = ablation(config, options, args.ablation_rounds)
        record["ablation"] = rows
        print("\nper-step time on one fixed batch (median of the rounds):")
        for row in rows:
            print(f"  {row['variant']:48s} {row['s_per_step']:7.2f} s  ×{row['speedup_vs_previous']:.2f} "
                  f"(×{row['speedup_vs_torchvision']:.2f} vs torchvision)")

    if not args.skip_training:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(args.work_dir) if args.work_dir else Path(tmp)
            print("\n[ours] train.py " + " ".join(train_flags), flush=True)
            ours = run_ours(train_flags, steps, iters_per_epoch, work)
            print("\n[torchvision] plain loop", flush=True)
            base = run_torchvision_loop(config, options, steps, args.torchvision_lr)
        record.update(ours=ours, torchvision=base, ratio_images_per_s=ours["images_per_s"] / base["images_per_s"])
        print(f"\n{'':14s} {'steps':>6s} {'img/s':>7s} {'loss':>7s} {'segm AP':>8s} {'AP50':>6s} {'DSB':>6s}")
        for name, r in (("torchvision", base), ("ours", ours)):
            print(f"{name:14s} {r['steps']:6d} {r['images_per_s']:7.3f} {r['final_loss']:7.3f} "
                  f"{r['segm_AP'] or 0:8.3f} {r['segm_AP50'] or 0:6.3f} {r['sartorius'] or 0:6.3f}")
        if base["diverged_at"]:
            print(f"the torchvision loop (SGD lr {base['lr']}) diverged at step {base['diverged_at']}: images/s over "
                  f"its {base['steps']} finite steps, no scores")
        print(f"images/s ratio (ours / torchvision loop): {record['ratio_images_per_s']:.2f}×")
    if args.out:
        from utils.io import write_json_atomic
        write_json_atomic(args.out, record)
        print(f"record: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
