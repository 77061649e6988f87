#!/usr/bin/env python
"""Cross-validation: every fold trained into one experiment directory, scored out of fold.

    python tools/cross_validate.py --dataset sartorius --data-path ROOT --num-folds 5 --name cv1 \\
        [any train.py flags] [--folds 0,2] [--comment TEXT] [--nms-iou 0.5]
    torchrun --nproc_per_node=4 tools/cross_validate.py --dataset sartorius --data-path ROOT --name cv1

Works for every dataset with folds: sartorius (grouped by sample_id), folder, coco/livecell
(folds of the training JSON) and synthetic. The experiment directory ``--output-dir/--name``:

  fold{k}/                       train.py's run directory of fold k (train.py --num-folds K --fold k)
  fold{k}/oof_predictions.json   fold k's best checkpoint on fold k's validation split (COCO results)
  fold{k}/val_gt.json            that split's ground truth
  fold{k}/fold.json              written when fold k is done: best epoch (counted from 1) and metrics, image ids
  oof_gt.json, oof_predictions.json   every image once, predicted by the model that did not see it
  postprocess.json               per-class score thresholds and minimum sizes searched on the OOF
                                 (evaluate.py --search's search; predict.py --postprocess reads it)
  cv_report.json, cv_report.txt  CV raw and post-processed: overall, per fold with mean ± std,
                                 per class, per IoU threshold
  metadata.json                  date, git commit, command, resolved config, dataset and folds,
                                 per-fold best metrics and epochs, thresholds and minimum sizes,
                                 cv_raw, cv_pp, comment (tools/runs_table.py lists experiments)

Rerunning the same command (same ``--name``) skips the folds that are done and resumes an
interrupted one (train.py ``--resume auto`` in its fold directory). The OOF report is made once
every fold is done, whichever run finishes the last of them. ``--max-time`` is per fold.
CV post-processed is searched and scored on the same OOF predictions (as Kaggle teams did), so it
is slightly optimistic. Afterwards:

    python predict.py IMAGES --checkpoint EXP/fold*/best.pth --postprocess EXP/postprocess.json --formats csv
    python evaluate.py --gt EXP/oof_gt.json --pred EXP/oof_predictions.json --postprocess EXP/postprocess.json
"""
from __future__ import annotations

import time

PROCESS_START = time.time()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from datasets import build_dataset  # noqa: E402
from engine import distributed  # noqa: E402
from engine.checkpoint import last_trained_epoch, load_checkpoint  # noqa: E402
from engine.config import ConfigError, TrainConfig  # noqa: E402
from engine.evaluation import evaluate_checkpoint, headline  # noqa: E402
from engine.logging import setup_logging  # noqa: E402
from metrics.crossval import cv_report, format_cv_report, merge_folds  # noqa: E402
from metrics.postprocess import format_search_table, search_postprocess  # noqa: E402
from metrics.validation import InvalidInputError  # noqa: E402
from utils.io import write_json_atomic, write_text_atomic  # noqa: E402

log = logging.getLogger("trainer")

OWN_FLAGS = ("folds", "comment", "nms_iou")
SET_PER_FOLD = {"fold": "--fold", "resume": "--resume", "test_only": "--test-only"}
DEFAULT_NUM_FOLDS = 5


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Cross-validation: train every fold, score out of fold, search "
                                            "post-processing (any train.py flag is passed to every fold)",
                                parents=[train.get_args_parser(add_help=False)],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("cross-validation")
    g.add_argument("--folds", type=train._ints, default=None,
                   help="folds to train in this run, e.g. 0,2 (default: all of --num-folds, 5 unless given)")
    g.add_argument("--comment", default=None, help="a note kept in metadata.json and shown by tools/runs_table.py")
    g.add_argument("--nms-iou", type=float, default=None,
                   help="post-processing search: mask-IoU NMS before overlap removal (as evaluate.py --nms-iou)")
    return p


# ------------------------------------------------------------------------------ experiment


def experiment_identity(args: argparse.Namespace, num_folds: int) -> dict:
    """What every fold of one experiment must share: the data and its split into folds."""
    options = {k: v for k, v in train.dataset_options(args).items() if k not in ("fold", "num_folds")}
    return {"dataset": args.dataset, "data_path": getattr(args, "data_path", None), "num_folds": num_folds,
            "dataset_options": {k: options[k] for k in sorted(options)}}


def check_same_experiment(exp_dir: Path, identity: dict) -> dict:
    """The existing metadata.json of ``exp_dir`` (or {}); a ``ConfigError`` when it describes other data or folds."""
    path = exp_dir / "metadata.json"
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc}); move it away or use another --name") from None
    before = saved.get("identity", {})
    changed = {k: (before.get(k), identity[k]) for k in identity if json.dumps(before.get(k)) != json.dumps(identity[k])}
    if changed:
        raise ConfigError(f"{exp_dir} holds an experiment on other data or folds ("
                          + "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in changed.items())
                          + "): use another --name, or rerun with its flags")
    return saved


def git_commit() -> tuple[str | None, bool | None]:
    """(HEAD commit of this code, whether tracked files differ from it); (None, None) outside git."""
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return sha, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return None, None


def fold_namespace(args: argparse.Namespace, exp_dir: Path, fold: int, num_folds: int) -> argparse.Namespace:
    """train.py's arguments for ``fold``: the given flags, plus the fold, its directory and --resume auto."""
    given = {k: v for k, v in vars(args).items() if k not in OWN_FLAGS}
    # name "." makes the fold directory itself the run directory; --resume auto then finds only its last.pth.
    given.update(num_folds=num_folds, fold=fold, output_dir=str(exp_dir / f"fold{fold}"), name=".", resume="auto")
    return argparse.Namespace(**given)


def fold_done(exp_dir: Path, fold: int) -> bool:
    return (exp_dir / f"fold{fold}" / "fold.json").is_file()


def train_fold(args: argparse.Namespace, exp_dir: Path, fold: int, num_folds: int, is_main: bool) -> None:
    """Train fold ``fold`` (resuming its last.pth if any), then predict its validation split
    with its best checkpoint and record the fold as done."""
    fold_dir = exp_dir / f"fold{fold}"
    train.main(fold_namespace(args, exp_dir, fold, num_folds), time.time())
    checkpoint = fold_dir / "best.pth"
    if not checkpoint.is_file():
        log.warning("fold %d has no best.pth (no evaluation scored it): its last.pth predicts the OOF images", fold)
        checkpoint = fold_dir / "last.pth"
    state = load_checkpoint(checkpoint)
    config = state["config"]
    # The checkpoint's own dataset options (this fold) and preprocessing, as evaluate.py --checkpoint uses them.
    report, results = evaluate_checkpoint(str(checkpoint), config["dataset"], {"data_path": config["data_path"]},
                                          config.get("device", "auto"), int(config["batch_size"]), None,
                                          workers=int(config["workers"]))
    best_epoch = last_trained_epoch(int(state["epoch"]), int(state["iteration"])) + 1   # counted from 1
    if is_main:
        options = TrainConfig.from_dict(config).data_options()
        gt = build_dataset(config["dataset"], "val", options, None).coco_gt()
        write_json_atomic(fold_dir / "val_gt.json", gt, indent=None)
        write_json_atomic(fold_dir / "oof_predictions.json", results, indent=None)
        write_json_atomic(fold_dir / "fold.json", {
            "fold": fold, "num_folds": num_folds, "checkpoint": checkpoint.name,
            "best_metric": config["best_metric"], "best_value": state.get("best_value"),
            "best_epoch": best_epoch, "best_metrics": state.get("metrics", {}),
            "oof": headline(report), "val_image_ids": [img["id"] for img in gt["images"]]})
        log.info("fold %d done: %s %s at epoch %d; OOF predictions → %s", fold, config["best_metric"],
                 state.get("best_value"), best_epoch, fold_dir / "oof_predictions.json")
    distributed.barrier()


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{path}: cannot read ({exc}); delete {path.parent / 'fold.json'} to redo that "
                                f"fold's predictions") from None


def score_out_of_fold(exp_dir: Path, num_folds: int, nms_iou: float | None) -> tuple[dict, dict, dict]:
    """OOF files, the post-processing search and the CV report → (report, params, config of fold 0)."""
    gts = {k: read_json(exp_dir / f"fold{k}" / "val_gt.json") for k in range(num_folds)}
    preds = {k: read_json(exp_dir / f"fold{k}" / "oof_predictions.json") for k in range(num_folds)}
    gt, results, fold_of = merge_folds(gts, preds)
    write_json_atomic(exp_dir / "oof_gt.json", gt, indent=None)
    write_json_atomic(exp_dir / "oof_predictions.json", results, indent=None)
    configs = [read_json(exp_dir / f"fold{k}" / "config.json") for k in range(num_folds)]
    config = configs[0]
    # Caps the data decide may differ by fold (each fold's training split): COCO maxDets takes the largest.
    max_dets = max(int(c["detections_per_img"]) for c in configs)
    class_names = [c["name"] for c in gt["categories"]]
    found = search_postprocess(gt, results, nms_iou=nms_iou)
    print(format_search_table(found))
    params = found["params"]
    write_json_atomic(exp_dir / "postprocess.json", params)
    report = cv_report(gt, results, fold_of, params, max_dets,
                       float(config["sartorius_score_thresh"]), class_names)
    report["search"] = {"score": found["score"], "baseline_score": found["baseline_score"], "nms_iou": nms_iou}
    write_json_atomic(exp_dir / "cv_report.json", report)
    text = format_cv_report(report)
    write_text_atomic(exp_dir / "cv_report.txt", text + "\n")
    print(text)
    return report, params, config


def write_metadata(exp_dir: Path, saved: dict, identity: dict, args: argparse.Namespace, argv: list[str],
                   num_folds: int, report: dict | None, params: dict | None) -> dict:
    folds, split = {}, {}
    for k in range(num_folds):
        if fold_done(exp_dir, k):
            info = read_json(exp_dir / f"fold{k}" / "fold.json")
            split[str(k)] = {"num_val_images": len(info["val_image_ids"]), "val_image_ids": info["val_image_ids"]}
            folds[str(k)] = {key: info[key] for key in ("checkpoint", "best_metric", "best_value", "best_epoch",
                                                        "best_metrics", "oof")}
            if report is not None:
                folds[str(k)]["cv"] = {kind: report["folds"][str(k)][kind]["score"] for kind in ("raw", "pp")}
    config_path = exp_dir / "fold0" / "config.json"
    if not config_path.is_file():
        config_path = next(iter(sorted(exp_dir.glob("fold*/config.json"))), config_path)
    commit, dirty = git_commit()
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    classes = (params or {}).get("classes", {})
    comment = args.comment if args.comment is not None else saved.get("comment")
    metadata = {
        "date": now, "created": saved.get("created", now),
        "status": "done" if report is not None else f"{len(folds)} of {num_folds} folds done",
        "git_commit": commit, "git_dirty": dirty,
        "command": shlex.join(["python", "tools/cross_validate.py", *argv]),
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        "config": read_json(config_path) if config_path.is_file() else None,
        "dataset": {**identity, "folds": split},
        "identity": identity,
        "folds": folds,
        "thresholds": {p["name"]: p["score_thresh"] for p in classes.values()},
        "min_sizes": {p["name"]: p["min_size"] for p in classes.values()},
        "cv_raw": report["cv_raw"]["score"] if report else None,
        "cv_pp": report["cv_pp"]["score"] if report else None,
        "cv_raw_segm_AP": report["cv_raw"]["segm_AP"] if report else None,
        "cv_pp_segm_AP": report["cv_pp"]["segm_AP"] if report else None,
        "fold_mean_std": report["fold_mean_std"] if report else None,
        "comment": comment,
    }
    write_json_atomic(exp_dir / "metadata.json", metadata)
    return metadata


# ------------------------------------------------------------------------------ main


def main(args: argparse.Namespace, argv: list[str]) -> int:
    num_folds = getattr(args, "num_folds", DEFAULT_NUM_FOLDS)
    for key, flag in SET_PER_FOLD.items():
        if key in vars(args):
            raise ConfigError(f"{flag}: cross_validate.py sets it for every fold; leave it out "
                              f"(choose folds with --folds, rerun with the same --name to resume)")
    if num_folds < 2:
        raise ConfigError(f"--num-folds must be ≥ 2 for cross-validation, got {num_folds}")
    folds = list(args.folds) if args.folds is not None else list(range(num_folds))
    bad = [k for k in folds if not 0 <= k < num_folds]
    if bad or not folds:
        raise ConfigError(f"--folds {','.join(map(str, folds))}: folds are 0..{num_folds - 1}")
    if args.nms_iou is not None and not 0 < args.nms_iou <= 1:
        raise ConfigError(f"--nms-iou must be in (0, 1], got {args.nms_iou}")

    dist_info, _ = distributed.init_distributed(getattr(args, "device", "auto"))
    name = getattr(args, "name", None) or f"{time.strftime('%Y%m%d-%H%M%S')}-cv-{args.dataset}"
    name = distributed.broadcast_object(name)
    exp_dir = Path(getattr(args, "output_dir", "runs")) / name
    args.name = name
    identity = experiment_identity(args, num_folds)
    saved = check_same_experiment(exp_dir, identity)
    if dist_info.is_main:
        exp_dir.mkdir(parents=True, exist_ok=True)
        write_metadata(exp_dir, saved, identity, args, argv, num_folds, None, None)
    distributed.barrier()
    setup_logging(dist_info.is_main, exp_dir / "cross_validate.log")
    log.info("experiment %s: %d folds of %s; this run: folds %s (rerun with --name %s to continue it)", exp_dir,
             num_folds, args.dataset, ",".join(map(str, folds)), name)

    for k in folds:
        if fold_done(exp_dir, k):
            log.info("fold %d: done already (%s), skipped", k, exp_dir / f"fold{k}" / "fold.json")
            continue
        log.info("fold %d of %d: training in %s", k, num_folds, exp_dir / f"fold{k}")
        train_fold(args, exp_dir, k, num_folds, dist_info.is_main)
        setup_logging(dist_info.is_main, exp_dir / "cross_validate.log")   # train.py logged to the fold's file

    distributed.barrier()
    if not dist_info.is_main:   # the OOF report is rank 0's alone: no other rank waits on it
        return 0
    missing = [k for k in range(num_folds) if not fold_done(exp_dir, k)]
    report = params = None
    if not missing:
        report, params, _ = score_out_of_fold(exp_dir, num_folds, args.nms_iou)
    write_metadata(exp_dir, check_same_experiment(exp_dir, identity), identity, args, argv, num_folds, report, params)
    if missing:
        log.info("folds %s are not done yet: the OOF report needs all %d (run them with --name %s --folds %s)",
                 ",".join(map(str, missing)), num_folds, name, ",".join(map(str, missing)))
    else:
        log.info("CV raw %.4f, post-processed %.4f → %s", report["cv_raw"]["score"], report["cv_pp"]["score"], exp_dir)
    return 0


def run_cli(argv: list[str] | None = None) -> int:
    """Parse, run, and turn expected failures into one clear line and an exit status (train.py's)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = get_args_parser()
    args = parser.parse_args(argv)
    return train.run_guarded(parser, lambda: main(args, argv),
                             lambda path: "rerun the same command (same --name) to resume this fold",
                             bad_input=(InvalidInputError,))


if __name__ == "__main__":
    sys.exit(run_cli())
