"""Train Mask R-CNN (torchvision) on the built-in synthetic cells, COCO, Sartorius, LIVECell or folders.

    python train.py                                   # synthetic cells, small model, a few minutes on CPU
    python train.py --dataset coco --data-path /data/coco --model maskrcnn_resnet50_fpn --weights-backbone DEFAULT
    torchrun --nproc_per_node=8 train.py --dataset coco --data-path /data/coco -b 2 --lr 0.02

Every flag left unset takes the dataset's default (datasets/<format>.py), then TrainConfig's.
"""
from __future__ import annotations

import time

PROCESS_START = time.time()   # --max-time counts the whole run, imports included

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Iterable  # noqa: E402

import torch  # noqa: E402

from datasets import build_dataset, dataset_defaults, dataset_names  # noqa: E402
from datasets.errors import as_bool  # noqa: E402
from datasets.registry import parse_option  # noqa: E402
from datasets.statistics import check_objects, recommend_sizes, resize_factor, statistics_from_coco  # noqa: E402
from engine import distributed  # noqa: E402
from engine.budget import format_duration, parse_duration  # noqa: E402
from engine.checkpoint import CheckpointError, find_latest, last_trained_epoch, load_for_resume, set_config_values  # noqa: E402
from engine.config import BEST_METRICS, ConfigError, TrainConfig, resolve_config, with_predating  # noqa: E402
from engine.data import TrainBatchSampler, aspect_ratio_groups, eval_loader, train_loader  # noqa: E402
from engine.evaluation import TestScaleSearch, Validation, headline  # noqa: E402
from engine.logging import setup_logging  # noqa: E402
from engine.optim import build_lr_scheduler, build_optimizer, plan_schedule  # noqa: E402
from engine.trainer import Trainer, TrainingDiverged, TrainingInterrupted  # noqa: E402
from models import HEAD_NORMS, WeightsError, build_model, model_names  # noqa: E402
from transforms import PRESETS, build_transforms  # noqa: E402
from transforms.preprocess import CHANNEL_MODES, INTENSITY_POLICIES, Preprocessing, image_channels  # noqa: E402
from transforms.presets import CROP_MODEL_PIXELS, crop_size_for  # noqa: E402
from utils.io import WRITE_REFUSALS, OutputError, remove_stale_temp_files, write_json_atomic  # noqa: E402

log = logging.getLogger("trainer")

# Flags that configure a dataset module rather than the trainer; passed through as a dict.
DATASET_FLAGS = ("train_ann", "val_ann", "train_images", "val_images", "num_folds", "fold", "val_fraction",
                 "val_path", "fill_holes", "drop_duplicates", "keep_empty", "skip_bad",
                 "synthetic_train_images", "synthetic_val_images", "synthetic_size", "synthetic_seed")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _key_value(text: str) -> tuple[str, str]:
    try:
        return parse_option(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Mask R-CNN training", add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    S = argparse.SUPPRESS  # unset flags stay absent, so dataset defaults can fill them
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", help=f"one of: {', '.join(dataset_names())}")
    g.add_argument("--data-path", default=S, help="dataset root")
    g.add_argument("--train-ann", default=S, help="COCO-format: training annotation json")
    g.add_argument("--val-ann", default=S, help="COCO-format: validation annotation json")
    g.add_argument("--train-images", default=S, help="COCO-format: training image folder")
    g.add_argument("--val-images", default=S, help="COCO-format: validation image folder")
    g.add_argument("--num-folds", type=int, default=S, help="k-fold split (sartorius: grouped by sample_id; also folder, coco, synthetic); "
                        "tools/cross_validate.py trains every fold")
    g.add_argument("--fold", type=int, default=S, help="which fold is validation")
    g.add_argument("--val-fraction", type=float, default=S, help="folder: fraction held out for validation")
    g.add_argument("--val-path", default=S, help="folder: a separate validation folder")
    g.add_argument("--fill-holes", action=argparse.BooleanOptionalAction, default=S,
                   help="sartorius: fill holes in training masks (hollow astro cells; default on)")
    g.add_argument("--drop-duplicates", action=argparse.BooleanOptionalAction, default=S,
                   help="sartorius: drop exact duplicate annotations (default on)")
    g.add_argument("--keep-empty", action=argparse.BooleanOptionalAction, default=S,
                   help="coco: keep training images without annotations as negatives (default off)")
    g.add_argument("--skip-bad", action=argparse.BooleanOptionalAction, default=S,
                   help="skip and count bad images/rows/annotations instead of stopping (default off)")
    g.add_argument("--synthetic-train-images", type=int, default=S, help="synthetic: training images")
    g.add_argument("--synthetic-val-images", type=int, default=S, help="synthetic: validation images")
    g.add_argument("--synthetic-size", type=int, default=S, help="synthetic: image side in pixels")
    g.add_argument("--synthetic-seed", type=int, default=S, help="synthetic: generator seed")
    g.add_argument("--dataset-opt", "--dataset-option", dest="dataset_opt", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="any other dataset option, repeatable (docs/datasets.md lists them: train_csv, "
                        "image_dir, fold_seed, check_images, split_seed, class_name)")
    g.add_argument("--data-augmentation", default=S, help=f"preset: {', '.join(PRESETS)}")
    g.add_argument("--intensity", default=S,
                   help=f"16-bit and float images: {' or '.join(INTENSITY_POLICIES)} (per-image 0.5–99.5th "
                        "percentiles, or the dtype's full range); 8-bit is always ÷255")
    g.add_argument("--channels", default=S,
                   help=f"auto, {' or '.join(CHANNEL_MODES)}: what the model sees (auto: from the first training image)")
    g.add_argument("--min-epoch-iters", type=int, default=S,
                   help="a tiny dataset is repeated within an epoch up to this many iterations")
    g.add_argument("--aspect-ratio-group-factor", type=int, default=S, help="-1 disables grouping")
    g.add_argument("-j", "--workers", type=int, default=S, help="data loading workers per process")

    g = p.add_argument_group("model")
    g.add_argument("--model", default=S, help=f"one of: {', '.join(model_names())} (default: the dataset's, else R50-FPN on a GPU, R18-FPN on CPU)")
    g.add_argument("--weights", default=S, help="full-model weights: torchvision name (DEFAULT, COCO_V1) or file")
    g.add_argument("--weights-backbone", default=S, help="backbone weights: torchvision name (DEFAULT) or file")
    g.add_argument("--trainable-backbone-layers", type=int, default=S, help="0..5")
    g.add_argument("--head-norm", choices=HEAD_NORMS, default=S,
                   help="BatchNorm in the FPN and mask head (default: batch for the R18/R34 models, which train "
                        "from scratch; none for R50-FPN, torchvision's layout; the v2 model always has it)")
    g.add_argument("--input-scale", type=float, default=S,
                   help="resize every training input by this factor, crops and whole images alike (default: from "
                        "the data's object sizes unless --min-size/--max-size/--anchor-sizes are given)")
    g.add_argument("--input-scale-test", type=float, default=S,
                   help="resize factor at evaluation and prediction (default: chosen on the validation images at "
                        "the end of training among 1, 1.25 and 1.5 × the input scale, or per image, see below)")
    g.add_argument("--object-diameter-test", type=float, default=S,
                   help="resize each image at evaluation and prediction so that its objects' median diameter (from "
                        "a first pass at --input-scale-test) becomes this many model pixels (default: chosen at the "
                        "end of training when the validation images' objects differ in size and it scores within 5 %% "
                        "of the best single factor)")
    g.add_argument("--min-size", type=int, default=S, help="torchvision's resize: shorter image side (COCO convention)")
    g.add_argument("--max-size", type=int, default=S, help="torchvision's resize: longer image side cap")
    g.add_argument("--anchor-sizes", type=_ints, default=S,
                   help="5 anchor sizes, one per FPN level (default: from the data's object sizes)")
    g.add_argument("--detections-per-img", type=int, default=S,
                   help="max detections per image; evaluation maxDets follows it")
    g.add_argument("--rpn-pre-nms-top-n-train", type=int, default=S)
    g.add_argument("--rpn-post-nms-top-n-train", type=int, default=S)
    g.add_argument("--rpn-pre-nms-top-n-test", type=int, default=S)
    g.add_argument("--rpn-post-nms-top-n-test", type=int, default=S)
    g.add_argument("--rpn-test-pixels", type=int, default=S,
                   help="model-input pixels the RPN's test caps are for; other inputs keep proportionally many "
                        "(default: a median training image when the caps come from the data, else fixed per input)")
    g.add_argument("--box-score-thresh", type=float, default=S)
    g.add_argument("--box-nms-thresh", type=float, default=S)
    g.add_argument("--box-batch-size-per-image", type=int, default=S,
                   help="RoIs sampled per image for the box and mask losses (Detectron2's BATCH_SIZE_PER_IMAGE)")
    g.add_argument("--sync-bn", action="store_true", default=S, help="SyncBatchNorm under DDP on CUDA")

    g = p.add_argument_group("optimisation")
    g.add_argument("--device", default=S, help="auto, cpu, cuda, cuda:N")
    g.add_argument("-b", "--batch-size", type=int, default=S, help="images per process")
    g.add_argument("--epochs", type=int, default=S, help="default 26, or as many as --max-time allows")
    g.add_argument("--max-time", type=_duration, default=S,
                   help="wall-time budget of the whole run (8m, 1h30m, 600): the run length is fixed from the "
                        "measured speed of the first steps so that training and the final evaluation fit")
    g.add_argument("--opt", default=S, help="sgd or adamw")
    g.add_argument("--lr", type=float, default=S, help="learning rate, used as given (not scaled by batch size or process "
                   "count); default 0.02 for sgd, 0.001 for adamw")
    g.add_argument("--momentum", type=float, default=S)
    g.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=S,
                   help="default 1e-4 for sgd, 0.05 for adamw")
    g.add_argument("--lr-scheduler", default=S, help="multistep or cosine")
    g.add_argument("--lr-steps", type=_ints, default=S,
                   help="epochs at which multistep decays (default: at 16/26 and 22/26 of the run)")
    g.add_argument("--lr-gamma", type=float, default=S)
    g.add_argument("--warmup-iters", type=int, default=S, help="default: 5 %% of the run, at most 1000")
    g.add_argument("--warmup-factor", type=float, default=S)
    g.add_argument("--clip-grad-norm", type=float, default=S, help="max gradient norm, 0 disables")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=S,
                   help="mixed precision in the training steps (fp16 on CUDA, bf16 on CPU); default: on for a CPU "
                        "with bf16 units, AMX or AVX-512 BF16 (1.2-1.7x faster steps), off elsewhere; evaluation runs in fp32")
    g.add_argument("--max-nonfinite", type=int, default=S, help="consecutive non-finite losses before stopping")

    g = p.add_argument_group("evaluation, checkpoints, run")
    g.add_argument("--eval-every", type=int, default=S,
                   help="epochs between evaluations (0: only at the end; default: about 4 per run, only the final "
                        "one with --max-time)")
    g.add_argument("--best-metric", default=S, help=f"one of: {', '.join(BEST_METRICS)}")
    g.add_argument("--sartorius-score-thresh", type=float, default=S, help="score cut for the Sartorius metric")
    g.add_argument("--test-only", action="store_true", default=S, help="evaluate --resume/--weights and exit")
    g.add_argument("--output-dir", default=S, help="parent of run directories")
    g.add_argument("--name", default=S, help="run directory name (default: timestamp-dataset-model)")
    g.add_argument("--resume", default=S, help="checkpoint path, or 'auto' for the newest last.pth in --output-dir")
    g.add_argument("--seed", type=int, default=S)
    g.add_argument("--deterministic", action="store_true", default=S, help="deterministic algorithms (slower)")
    g.add_argument("--print-freq", type=int, default=S)
    # torch.distributed.launch without --use_env passes this; the rank is read from LOCAL_RANK anyway.
    g.add_argument("--local-rank", "--local_rank", type=int, default=S, help=S)
    return p


# Options the data's object and image sizes choose when neither the user nor the dataset's
# defaults fix them (datasets/statistics.py). A scale fixed by flags (--input-scale, or
# --min-size/--max-size) still gets anchors from the data, measured at that scale.
GEOMETRY_KEYS = ("input_scale", "min_size", "max_size", "anchor_sizes")
CAP_KEYS = ("detections_per_img", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test")


def pinned_options(args: argparse.Namespace) -> set[str]:
    """Options fixed by a flag or by the dataset's defaults (the rest may come from the data)."""
    given = set(vars(args))
    try:
        given |= set(dataset_defaults(args.dataset, dataset_options(args)))
    except ValueError:
        pass
    return given


def dataset_options(args: argparse.Namespace) -> dict:
    given = vars(args)
    options = {k: given[k] for k in DATASET_FLAGS if k in given}
    options.update(dict(given.get("dataset_opt", [])))
    return options


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Flags → the frozen ``TrainConfig``: explicit flags over the dataset's defaults
    (``applied_dataset_defaults``) over the fields' own defaults, validated."""
    given = vars(args).copy()
    given.pop("local_rank", None)
    dataset = given.pop("dataset")
    options = dataset_options(args)
    given.pop("dataset_opt", None)
    for k in DATASET_FLAGS:
        given.pop(k, None)
    given.update(dataset=dataset, dataset_options=options)
    return resolve_config(given, applied_dataset_defaults(args))


def applied_dataset_defaults(args: argparse.Namespace) -> dict:
    """The dataset's default options this run takes: those no flag overrides, without the learning
    rate and weight decay of another optimizer than the one asked for, nor ``input_scale`` when
    ``--min-size``/``--max-size`` ask for torchvision's resize."""
    given = vars(args)
    try:
        defaults = dataset_defaults(args.dataset, dataset_options(args))
    except ValueError as exc:
        raise ConfigError(f"--dataset: {exc}") from None
    if "opt" in given and defaults.get("opt", given["opt"]) != given["opt"]:
        # The dataset's learning rate and weight decay belong to its optimizer, not to the one asked for.
        defaults.pop("lr", None)
        defaults.pop("weight_decay", None)
    if {"min_size", "max_size"} & set(given):
        for flag in ("input_scale", "input_scale_test", "object_diameter_test"):
            if flag in given:
                what = "needs" if flag == "object_diameter_test" else "is"
                raise ConfigError(f"--{flag.replace('_', '-')} {what} a fixed resize factor, --min-size/--max-size "
                                  f"torchvision's resize: give one or the other")
        defaults.pop("input_scale", None)   # the user asked for torchvision's resize
    return {k: v for k, v in defaults.items() if given.get(k) is None}


def seed_everything(seed: int, deterministic: bool) -> None:
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def resolve_resume(config: TrainConfig) -> Path | None:
    if not config.resume:
        return None
    if config.resume == "auto":
        latest = find_latest(config.output_dir)
        if latest is None:
            log.info("--resume auto: no checkpoint under %s, starting fresh", config.output_dir)
        return latest
    path = Path(config.resume)
    if not path.is_file():
        raise ConfigError(f"--resume {path}: no such file (use --resume auto to pick the newest in --output-dir)")
    return path


def make_run_dir(config: TrainConfig, resume_from: Path | None, dist_info) -> Path:
    if resume_from is not None:
        return resume_from.parent
    name = config.name or f"{time.strftime('%Y%m%d-%H%M%S')}-{config.dataset}-{config.model}"
    name = distributed.broadcast_object(name)  # every rank writes to rank 0's choice
    run_dir = Path(config.output_dir) / name
    if dist_info.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno not in WRITE_REFUSALS:
                raise
            raise ConfigError(f"--output-dir {config.output_dir}: cannot create the run directory {run_dir} "
                              f"({WRITE_REFUSALS[exc.errno]}); choose a writable --output-dir") from None
    distributed.barrier()
    return run_dir


def warn_config_changes(saved: dict, config: TrainConfig) -> None:
    # input_scale_test, object_diameter_test: what the end of the run chose (it chooses again), unless a flag fixed it.
    ignore = {"resume", "epochs", "output_dir", "name", "print_freq", "workers", "eval_every", "test_only", "device",
              "max_time", "input_scale_test", "object_diameter_test"}
    now = config.to_dict()
    # A field newer than the checkpoint is no change (anchor_ratios, since TrainConfig took ModelOptions' fields).
    changed = {k: (saved[k], now[k]) for k in now if k not in ignore and k in saved and saved[k] != now[k]}
    if changed:
        log.warning("resuming with options that differ from the checkpoint's: %s",
                    ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in changed.items()))


def resolve_from_data(config: TrainConfig, pinned: set[str], train_set) -> TrainConfig:
    """Fill what the data decides: channels from the first training image, and sizes and caps
    from the annotations' object statistics for the options nothing else fixed. Also stops on
    data no model can learn from (every object tiny, or every object the whole image)."""
    changes: dict = {}
    if config.channels == "auto":
        image, _ = train_set[0]   # no transforms yet: the image as stored
        changes["channels"] = image_channels(image)
        log.info("channels: %s (from %s)", changes["channels"], _first_image_name(train_set))
    scale_open = not pinned & {"input_scale", "min_size", "max_size"}
    open_keys = [*(("input_scale",) if scale_open else ()), *(k for k in ("anchor_sizes", *CAP_KEYS) if k not in pinned)]
    if open_keys:
        started = time.time()
        stats = statistics_from_coco(train_set.coco_gt())
        check_objects(stats, f"training data of --dataset {config.dataset} ({config.data_path or 'built in'})")
        scale = None
        if not scale_open:   # anchors follow the scale the flags fixed
            scale = config.input_scale or resize_factor(stats, config.min_size, config.max_size)
        recommended, reasons = recommend_sizes(stats, scale)
        log.info("data: %s (%.1f s)", stats.describe(), time.time() - started)
        for key in open_keys:
            changes[key] = recommended[key]
        if {"rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test"} <= set(open_keys) and "rpn_test_pixels" not in pinned:
            changes["rpn_test_pixels"] = recommended["rpn_test_pixels"]   # the caps the data chose follow the area
        topics = {"input": "input_scale", "anchors": "anchor_sizes", "detections": "detections_per_img"}
        for line in reasons:
            if topics.get(line.split(" ")[0]) in open_keys:
                log.info("sizes from the data: %s", line)
    return dataclasses.replace(config, **changes) if changes else config


def searches_test_scale(config: TrainConfig, pinned: set[str]) -> bool:
    """Whether the end of this run chooses the test scale on the validation images: a fixed
    input scale (not torchvision's min/max-size resize) and neither --input-scale-test nor
    --object-diameter-test."""
    return (config.input_scale is not None and not config.test_only
            and not {"input_scale_test", "object_diameter_test"} & pinned)


def choose_test_scale(search: TestScaleSearch, config: TrainConfig, report: dict, run_dir: Path,
                      is_main: bool, deadline: float | None = None) -> tuple[TrainConfig, dict]:
    """Run ``search`` after the final validation (``report``), within a time budget's
    ``deadline`` if there is one, log it, and store the chosen test scale (and object diameter,
    for per-image scales) in the run's config.json and checkpoints; the report of the choice
    replaces ``report`` in eval_report.json. → ``(config, report)``."""
    started = time.time()
    epoch = -1
    if is_main and (run_dir / "eval_report.json").is_file():
        epoch = json.loads((run_dir / "eval_report.json").read_text()).get("epoch", -1)
    choice = search(epoch, report, deadline)
    metric = config.best_metric
    tried = ", ".join(f"×{f:g} {n.get(metric, float('nan')):.4f}" for f, n in choice.numbers.items())
    if choice.per_image is not None:
        tried += f", per image {choice.per_image.get(metric, float('nan')):.4f}"
    if choice.object_diameter is not None:
        what = (f"a scale per image: objects shown at a median diameter of {choice.object_diameter:.1f} px "
                f"(measured at test scale {choice.scale:g})")
    else:
        what = f"test scale {choice.scale:g} (×{choice.scale / config.input_scale:g} the training scale {config.input_scale:g})"
    log.info("%s, chosen by %s on %d validation image(s): %s (%.1f s)", what, metric,
             len(search.subset.loader.dataset), tried, time.time() - started)
    values = {"input_scale_test": choice.scale, "object_diameter_test": choice.object_diameter}
    config = dataclasses.replace(config, **values)
    if is_main:
        write_json_atomic(run_dir / "config.json", config.to_dict())
        write_json_atomic(run_dir / "eval_report.json", {"epoch": epoch, **values, **choice.report})
        for name in ("last.pth", "best.pth"):
            if (run_dir / name).is_file():
                set_config_values(run_dir / name, **values)
    return config, choice.report


def _first_image_name(dataset) -> str:
    path = getattr(dataset, "image_path", None)
    return str(path(0)) if callable(path) else "image 0"


def plan_run(config: TrainConfig, iters_per_epoch: int, resuming: bool, started: float):
    """The LR schedule and, for a fresh run with ``--max-time``, the deadline of the whole run."""
    if config.max_time is None:
        return plan_schedule(config, iters_per_epoch, (config.epochs or 26) * iters_per_epoch), None
    # Provisional until the first steps are measured (engine/budget.py); a resumed run gets the
    # stored, fixed plan from its checkpoint instead.
    provisional = plan_schedule(config, iters_per_epoch, (config.epochs or 26) * iters_per_epoch, fixed=False)
    deadline = None if resuming else started + config.max_time
    return provisional, deadline


def main(args: argparse.Namespace, started: float | None = None,
         after_step: Iterable[Callable[[Trainer, int, int], None]] = ()) -> dict:
    """Train (or, with ``--test-only``, evaluate) as ``args`` (from ``get_args_parser``) say and
    return the final validation report. ``started``: when the run began, for ``--max-time`` (the
    CLI passes the process start; in-process callers default to now). ``after_step``: hooks the
    trainer calls after every step as ``hook(trainer, epoch, batches_done)`` (engine/trainer.py),
    e.g. to stop at a chosen position with ``trainer.request_stop()``. Bad flags or data raise
    ``ConfigError``/``ValueError`` naming the flag or file; ``run_cli`` turns them into exit status 2."""
    started = time.time() if started is None else started
    config = config_from_args(args)
    pinned = pinned_options(args)
    dist_info, device = distributed.init_distributed(config.device)
    resume_from = resolve_resume(config)
    run_dir = make_run_dir(config, resume_from, dist_info)
    try:
        setup_logging(dist_info.is_main, run_dir / "train.log")
    except OSError as exc:
        if exc.errno not in WRITE_REFUSALS:
            raise
        raise ConfigError(f"cannot write {run_dir / 'train.log'} ({WRITE_REFUSALS[exc.errno]}): the run directory "
                          f"must be writable (--output-dir)") from None
    seed_everything(config.seed + dist_info.rank, config.deterministic)
    log.info("run directory %s; device %s; %d process(es)", run_dir, device, dist_info.world_size)
    from_defaults = applied_dataset_defaults(args)
    if from_defaults:
        log.info("from the %s dataset's defaults: %s", config.dataset,
                 ", ".join(f"{k}={getattr(config, k)!r}" for k in sorted(from_defaults)))
    if config.amp and "amp" not in vars(args) and "amp" not in from_defaults:
        log.info("mixed precision: bf16 autocast in the training steps, chosen for this CPU's bf16 units "
                 "(AMX or AVX-512 BF16; --no-amp for fp32)")
    if resume_from is not None and dist_info.is_main:
        for stale in remove_stale_temp_files(run_dir):
            log.info("removed %s, left by a write that was cut short", stale)

    options = config.data_options()
    train_set = build_dataset(config.dataset, "train", options, None)
    val_set = build_dataset(config.dataset, "val", options, None)
    class_names = list(train_set.class_names)
    log.info("dataset %s: %d training / %d validation images, classes %s", config.dataset, len(train_set),
             len(val_set), class_names)
    # Both splits may index the same files (folder, sartorius): each skipped item is named once.
    skipped = list(dict.fromkeys(m for d in (train_set, val_set)
                                 for m in getattr(getattr(d, "log", None), "skipped", [])))
    if skipped:
        log.warning("data: %d bad item(s) skipped while indexing (--skip-bad): %s%s", len(skipped),
                    "; ".join(skipped[:10]), " …" if len(skipped) > 10 else "")
    state = None
    if resume_from is not None:
        state, resume_from = load_for_resume(resume_from)
    if state is None:
        config = resolve_from_data(config, pinned, train_set)
    else:   # the data decided these (and --max-time the length) when the run started; the checkpoint keeps them
        saved = with_predating(state.get("config", {}))
        config = dataclasses.replace(config, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items()
                                                if k in (*GEOMETRY_KEYS, *CAP_KEYS, "rpn_test_pixels", "channels",
                                                         "model", "head_norm", "max_time")
                                                and k not in pinned})
    contract = Preprocessing.from_config(config.to_dict())
    crop = crop_size_for(config.input_scale)
    train_set.transforms = build_transforms(config.data_augmentation, True, contract, crop_size=crop)
    val_set.transforms = build_transforms(config.data_augmentation, False, contract)
    if dist_info.is_main:
        write_json_atomic(run_dir / "config.json", config.to_dict())
    log.info("model %s, %s; preprocessing: %s, 16-bit/float intensity %s%s", config.model,
             f"input scale {config.input_scale}" if config.input_scale is not None else
             f"resize to min_size {config.min_size} / max_size {config.max_size}", contract.channels, contract.intensity,
             f"; training crops of up to {crop} px ({CROP_MODEL_PIXELS} model-input px)"
             if config.data_augmentation == "cells" and config.input_scale is not None else "")

    model = build_model(config.model, len(class_names), config.model_options(), config.weights,
                        config.weights_backbone).to(device)
    model_without_ddp = model
    if dist_info.distributed:
        if config.sync_bn and device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif config.sync_bn:
            log.warning("--sync-bn needs CUDA; ignored on %s", device)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        model_without_ddp = model.module

    sizes = [train_set.get_image_size(i) for i in range(len(train_set))]
    batch_sampler = TrainBatchSampler(aspect_ratio_groups(sizes, config.aspect_ratio_group_factor), config.batch_size,
                                      config.seed, dist_info.rank, dist_info.world_size,
                                      min_batches=config.min_epoch_iters)
    if batch_sampler.passes > 1:
        log.info("%d training images: each epoch repeats them %d times (%d iterations; --min-epoch-iters %d)",
                 len(train_set), batch_sampler.passes, len(batch_sampler), config.min_epoch_iters)
    loader = train_loader(train_set, batch_sampler, config.seed, config.workers,
                          skip_bad=as_bool(config.dataset_options.get("skip_bad"), False))
    val = eval_loader(val_set, config.batch_size, config.workers, dist_info.rank, dist_info.world_size)
    optimizer = build_optimizer(model_without_ddp, config)
    schedule, deadline = plan_run(config, len(batch_sampler), resume_from is not None, started)
    lr_scheduler = build_lr_scheduler(optimizer, schedule)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda")
    if deadline is not None:
        log.info("time budget %s: %s used before the first step", format_duration(config.max_time),
                 format_duration(time.time() - started))

    # Evaluation in fp32 whatever --amp says: its numbers (and the best checkpoint) are then the ones
    # evaluate.py and predict.py reproduce exactly.
    validation = Validation(model_without_ddp, val, val_set.coco_gt(), device, config.detections_per_img, False,
                            config.sartorius_score_thresh, class_names, dist_info=dist_info,
                            predictions_path=run_dir / "predictions.json" if config.test_only else None)
    search = None
    if searches_test_scale(config, pinned) and len(val_set):
        search = TestScaleSearch(validation, model_without_ddp.transform, config.best_metric)
    eval_seconds = validation.estimate_seconds
    if search is not None:   # the budget's final evaluation includes the search
        def eval_seconds() -> float:
            return validation.estimate_seconds(1 + search.cost())
    trainer = Trainer(config, model=model, model_without_ddp=model_without_ddp, optimizer=optimizer,
                      lr_scheduler=lr_scheduler, scaler=scaler, schedule=schedule, class_names=class_names,
                      train_loader=loader, batch_sampler=batch_sampler,
                      evaluate_fn=validation, eval_seconds=eval_seconds,
                      device=device, dist_info=dist_info, run_dir=run_dir, deadline=deadline, after_step=after_step)
    if state is not None:
        warn_config_changes(state.get("config", {}), config)
        trainer.load_state_dict(state)
        log.info("resumed from %s at epoch %d, iteration %d", resume_from, trainer.start_epoch + 1,
                 trainer.start_iteration)

    if config.test_only:
        if resume_from is None and not config.weights:
            raise ConfigError("--test-only needs a model to evaluate: pass --resume PATH or --weights")
        report = trainer.evaluate(last_trained_epoch(trainer.start_epoch, trainer.start_iteration))
    else:
        started = time.time()
        report = trainer.train()
        log.info("training took %.1f s", time.time() - started)
        if report and search is not None:
            config, report = choose_test_scale(search, config, report, run_dir, dist_info.is_main,
                                               trainer.deadline)
    if report and dist_info.is_main:
        write_json_atomic(run_dir / "report.json", report)
        flat = headline(report)
        log.info("final validation: segm AP %.4f  AP50 %.4f  Sartorius score %.4f  (bbox AP %.4f)",
                 flat.get("segm_AP", float("nan")), flat.get("segm_AP50", float("nan")),
                 flat.get("sartorius", float("nan")), flat.get("bbox_AP", float("nan")))
        log.info("run directory: %s", run_dir)
    return report


def run_cli(argv: list[str] | None = None) -> int:
    """Parse, run, and turn expected failures into one clear line and an exit status."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    def train_once() -> int:
        main(args, PROCESS_START)
        return 0
    return run_guarded(parser, train_once, lambda path: f"resume with --resume {path}")


def run_guarded(parser: argparse.ArgumentParser, call: Callable[[], int | None], resume_hint: Callable[[Path], str],
                bad_input: tuple[type[Exception], ...] = ()) -> int:
    """``call()`` → its exit status (0 for None), expected failures → one clear line and a status:
    2 bad flags or data (also ``bad_input``), 3 training diverged, 4 an output could not be written,
    128+N stopped by signal N with a checkpoint (``resume_hint`` says how to continue)."""
    try:
        return call() or 0
    except (ConfigError, WeightsError, CheckpointError, *bad_input) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    except ValueError as exc:  # bad data (datasets raise ValueError subclasses naming the file/row)
        if os.environ.get("MRCNN_TRACEBACK"):
            raise
        parser.exit(2, f"{parser.prog}: error: {exc}\n(set MRCNN_TRACEBACK=1 to see the traceback)\n")
    except OutputError as exc:   # a full disk or a read-only folder: what survives is in the message
        log.error("%s", exc)
        parser.exit(4, f"{parser.prog}: error: {exc}\n")
    except TrainingInterrupted as exc:
        log.warning("interrupted: checkpoint %s written; %s", exc.checkpoint, resume_hint(exc.checkpoint))
        return 128 + exc.signum
    except TrainingDiverged as exc:
        log.error("%s", exc)
        return 3
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(run_cli())
