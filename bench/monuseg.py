#!/usr/bin/env python
"""MoNuSeg benchmark: train within a wall-time budget, predict the validation images, score them.

    python bench/monuseg.py --max-time 20m
    python bench/monuseg.py --max-time 20m -- --model maskrcnn_resnet18_fpn --lr 0.001
    python bench/monuseg.py --score-only --pred-dir /tmp/monuseg-bench-X/pred/NAME

Reads the 24 labelled MoNuSeg training images (``../shared/data/monuseg/train``, the ``folder``
layout; ``--data-root`` to change) and splits them into a FIXED validation set of 5
(``VAL_IMAGES``) and 19 training images. The 5 are chosen, not drawn, so that every run is
judged on the same images and both kinds of tissue weigh in:

  dense   TCGA-HE-7129 (kidney, 1,584 nuclei), TCGA-RD-A8N9 (stomach, 1,165)
  sparse  TCGA-21-5784 (liver, 398), TCGA-E2-A1B5 (breast, 328), TCGA-G9-6362 (prostate, 472)

Five organs, one image each, so no single tissue decides the score; every organ keeps training
images (the dense kidney HE-7128 and HE-7130 and the dense stomach KB-A93J among them), and
bladder and colon, one image each in the set, stay in training. Dense images weigh most in the
pooled AP (2,749 of the 3,947 validation nuclei; 14,598 in all 24 images), the sparse ones count
as much as the dense ones in the per-image means (DSB, AJI). Organs as the MoNuSeg release lists
them.

Steps (the work dir defaults to a new folder in the temp dir, /tmp; ``--work-dir`` to choose):
  1. ``WORK/train/{images,masks}`` and ``WORK/val/{images,masks}``: symlinks to the shared
     files, never copies.
  2. ``python train.py --dataset folder --data-path WORK/train --val-path WORK/val --max-time
     BUDGET --output-dir WORK/runs --name NAME [flags after --]`` from the repository root; wall
     time and peak RSS of the process tree (the largest single process, from ``wait4``) are
     measured, the iterations read from ``last.pth`` (``global_step``).
  3. ``python predict.py WORK/val/images --checkpoint RUN/best.pth --output-dir WORK/pred/NAME
     --formats labels json --quiet`` (``RUN/last.pth`` when there is no best.pth).
  4. Scores on the 5 images: COCO segm AP and AP50 of ``predictions.json`` (every detection;
     maxDets ``--max-dets``, default 3000, above the ~1,900 nuclei of the densest image), and
     from the label images (score ≥ ``--score-thresh``, non-overlapping) the DSB/Sartorius
     score and AJI, means over images; instance counts per image.
  5. A table on stdout and a JSON record at ``--out`` (default ``WORK/monuseg_result.json``).

Note: train.py also validates on these 5 images and keeps the best checkpoint by them, so
``best.pth`` scores are slightly optimistic; ``--checkpoint last`` predicts with ``last.pth``.
Omit ``--max-time`` to train by epochs (e.g. ``-- --epochs 1`` for a smoke test).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data" / "monuseg"
VAL_IMAGES = (
    "TCGA-HE-7129-01Z-00-DX1",   # kidney, dense (1,584 nuclei)
    "TCGA-RD-A8N9-01A-01-TS1",   # stomach, dense (1,165)
    "TCGA-21-5784-01Z-00-DX1",   # liver, sparse (398)
    "TCGA-E2-A1B5-01Z-00-DX1",   # breast, sparse (328)
    "TCGA-G9-6362-01Z-00-DX1",   # prostate, sparse (472)
)
# Organ by TCGA tissue-source-site code, as the MoNuSeg release lists its images.
ORGANS = {"A7": "breast", "AR": "breast", "E2": "breast", "B0": "kidney", "HE": "kidney",
          "18": "liver", "21": "liver", "38": "liver", "49": "liver", "50": "liver",
          "G9": "prostate", "CH": "prostate", "DK": "bladder", "G2": "bladder",
          "AY": "colon", "NH": "colon", "KB": "stomach", "RD": "stomach"}
IMAGE_SUFFIXES = (".png", ".tif", ".tiff")


class BenchError(Exception):
    """A problem that stops the benchmark; the message names the file or flag."""


def organ(name: str) -> str:
    parts = name.split("-")
    return ORGANS.get(parts[1], "?") if len(parts) > 1 else "?"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s [options] [-- TRAIN.PY FLAGS ...]")
    p.add_argument("--max-time", metavar="BUDGET",
                   help="train.py's wall-time budget (20m, 90s, 1h, or seconds); omitted: train by epochs")
    p.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT),
                   help="MoNuSeg folder holding train/images and train/masks")
    p.add_argument("--work-dir", help="folder for the split links, runs and predictions "
                                      "(default: a new folder under the system temp dir)")
    p.add_argument("--name", help="run name (default monuseg-DATE-TIME)")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="which checkpoint of the run predicts (best.pth falls back to last.pth)")
    p.add_argument("--score-thresh", type=float, default=0.5,
                   help="predict.py --score-thresh: minimum score of the instances in the label images")
    p.add_argument("--max-dets", type=int, default=3000, help="COCO maxDets of the AP evaluation")
    p.add_argument("--out", help="JSON record (default WORK/monuseg_result.json; with --score-only "
                                 "PRED_DIR/monuseg_score.json)")
    score = p.add_argument_group("scoring an existing prediction folder")
    score.add_argument("--score-only", action="store_true", help="only score --pred-dir; no training, no prediction")
    score.add_argument("--pred-dir", help="predict.py output: NAME_labels.png per image and predictions.json")
    score.add_argument("--gt-dir", help="ground truth in the folder layout (images/ + masks/); every image in it "
                                        "is scored (default: the 5 validation images of --data-root)")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Our flags, and the train.py flags after the first ``--``."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


# ------------------------------------------------------------------------------- work dir


def _files_by_stem(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise BenchError(f"{folder}: not a folder (expected the MoNuSeg layout train/images + train/masks)")
    return {f.stem: f for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES}


def split_names(data_root: Path, val_names=VAL_IMAGES) -> tuple[list[str], list[str]]:
    """(train names, val names) of the labelled images under ``data_root/train``."""
    images = _files_by_stem(data_root / "train" / "images")
    masks = _files_by_stem(data_root / "train" / "masks")
    missing = [n for n in val_names if n not in images or n not in masks]
    if missing:
        raise BenchError(f"{data_root / 'train'}: validation image(s) without image or mask file: {', '.join(missing)}")
    unlabelled = sorted(set(images) - set(masks))
    if unlabelled:
        raise BenchError(f"{data_root / 'train' / 'masks'}: no label image for {', '.join(unlabelled)}")
    return [n for n in sorted(images) if n not in val_names], list(val_names)


def _clear_links(folder: Path) -> None:
    """Empty a split folder made by an earlier run; refuse to touch anything but symlinks."""
    if not folder.exists():
        folder.mkdir(parents=True)
        return
    strangers = [f.name for f in folder.iterdir() if not f.is_symlink()]
    if strangers:
        raise BenchError(f"{folder}: holds {len(strangers)} file(s) that are not links made by this script "
                         f"(e.g. {strangers[0]}); choose another --work-dir")
    for f in folder.iterdir():
        f.unlink()


def prepare_work_dir(data_root: Path, work_dir: Path, train: list[str], val: list[str]) -> None:
    """``work_dir/{train,val}/{images,masks}`` as symlinks to the shared files (no copies)."""
    for kind in ("images", "masks"):
        sources = _files_by_stem(data_root / "train" / kind)
        for split, names in (("train", train), ("val", val)):
            folder = work_dir / split / kind
            _clear_links(folder)
            for name in names:
                (folder / sources[name].name).symlink_to(sources[name].resolve())


# ------------------------------------------------------------------------------- subprocesses


def run_measured(command: list[str], cwd: Path) -> dict:
    """Run ``command``; its exit status, wall time and peak RSS (the largest single process of its
    tree: ``wait4``'s ``ru_maxrss`` covers the child and the descendants it waited for)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except KeyboardInterrupt:
        proc.wait()    # the child got the same Ctrl-C (train.py then saves last.pth): let it finish
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)    # reaped by wait4, so Popen must be told
    return {"returncode": proc.returncode, "wall_s": round(time.perf_counter() - start, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}   # Linux reports KiB


def train_command(work_dir: Path, name: str, budget: str | None, extra: list[str]) -> list[str]:
    command = [sys.executable, "train.py", "--dataset", "folder", "--data-path", str(work_dir / "train"),
               "--val-path", str(work_dir / "val"), "--output-dir", str(work_dir / "runs"), "--name", name]
    if budget:
        command += ["--max-time", budget]
    return command + extra


def predict_command(images: Path, checkpoint: Path, pred_dir: Path, score_thresh: float) -> list[str]:
    return [sys.executable, "predict.py", str(images), "--checkpoint", str(checkpoint), "--output-dir", str(pred_dir),
            "--formats", "labels", "json", "--score-thresh", str(score_thresh), "--quiet"]


def read_run(run_dir: Path) -> dict:
    """Iterations and training speed of a finished run directory, and its config and
    final validation numbers where present."""
    out: dict = {"run_dir": str(run_dir)}
    steps, times = [], []
    log = run_dir / "metrics.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            rec = json.loads(line) if line.strip() else {}
            if rec.get("type") == "train":
                steps.append(int(rec["step"]))
                times.append(float(rec.get("time", "nan")))
    last = run_dir / "last.pth"
    if last.is_file():
        import torch
        state = torch.load(last, map_location="cpu", weights_only=True)
        out["iterations"] = int(state.get("global_step", steps[-1] if steps else 0))
    elif steps:
        out["iterations"] = steps[-1]
    if len(steps) >= 2 and times[-1] > times[0]:
        # Between the first and last logged steps: the training speed without start-up (the
        # evaluations that fall in between are included).
        out["s_per_iter_logged"] = round((times[-1] - times[0]) / (steps[-1] - steps[0]), 4)
    for key, file in (("config", "config.json"), ("final_report", "report.json")):
        if (run_dir / file).is_file():
            out[key] = json.loads((run_dir / file).read_text())
    return out


# ------------------------------------------------------------------------------- scoring


def _gt_items(gt_dir: Path, names: list[str] | None):
    from datasets.folder import scan_folder

    items = scan_folder(str(gt_dir))
    if names is None:
        return items
    by_name = {it.name: it for it in items}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise BenchError(f"{gt_dir}: no image/label pair for {', '.join(missing)}")
    return [by_name[n] for n in names]


def _pred_label_path(pred_dir: Path, name: str) -> Path:
    for suffix in (".png", ".tif"):       # predict.py writes .tif above 65535 instances
        path = pred_dir / f"{name}_labels{suffix}"
        if path.is_file():
            return path
    raise BenchError(f"{pred_dir}: no {name}_labels.png (run predict.py with --formats labels json)")


def _one_image(gt: dict, image_id: int) -> dict:
    return {**gt, "images": [i for i in gt["images"] if i["id"] == image_id],
            "annotations": [a for a in gt["annotations"] if a["image_id"] == image_id]}


def _score_image(item, image_id: int, gt: dict, results: list[dict], pred_dir: Path, max_dets: int) -> dict:
    """One image: COCO AP of its results, AJI and DSB of its label images, instance counts."""
    from datasets.imageio import read_label_image
    from metrics import evaluate_predictions
    from metrics.aji import score_label_images

    gt_labels = read_label_image(item.mask_paths[0])
    pred_path = _pred_label_path(pred_dir, item.name)
    pred_labels = read_label_image(str(pred_path))
    if pred_labels.shape != gt_labels.shape:
        raise BenchError(f"{pred_path}: {pred_labels.shape[0]}×{pred_labels.shape[1]}, ground truth "
                         f"{item.mask_paths[0]} is {gt_labels.shape[0]}×{gt_labels.shape[1]}")
    image_results = [r for r in results if r["image_id"] == image_id]
    coco = evaluate_predictions(_one_image(gt, image_id), image_results, max_dets, iou_types=("segm",),
                                validate=False)["coco"]["segm"]
    return {"organ": organ(item.name), **score_label_images(gt_labels, pred_labels),
            "num_detections": len(image_results), "segm_AP": coco["AP"], "segm_AP50": coco["AP50"]}


def score_predictions(gt_dir: str | Path, pred_dir: str | Path, names: list[str] | None = None,
                      max_dets: int = 3000) -> dict:
    """Score predict.py's outputs in ``pred_dir`` against the label images in ``gt_dir``.

    ``gt_dir`` is the folder layout (``images/NAME.*`` + ``masks/NAME.*``); ``names`` restricts
    the images scored (default: all of ``gt_dir``). ``pred_dir`` holds ``NAME_labels.png`` and
    ``predictions.json`` (COCO results, ``image_id`` = NAME). Returns ``{"metrics": {segm_AP,
    segm_AP50, sartorius, aji, num_gt, num_pred, ...}, "per_image": {NAME: {...}}, ...}``:
    AP and AP50 pooled over the images (COCO), DSB/Sartorius and AJI means over images.
    """
    from datasets.folder import FolderDataset
    from metrics import evaluate_predictions

    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    dataset = FolderDataset(_gt_items(gt_dir, names))
    gt = dataset.coco_gt()
    image_id = dict(zip(dataset.names, dataset.image_ids))
    pred_json = pred_dir / "predictions.json"
    if not pred_json.is_file():
        raise BenchError(f"{pred_json}: missing (run predict.py with --formats labels json)")
    try:
        all_results = json.loads(pred_json.read_text())
    except ValueError as exc:
        raise BenchError(f"{pred_json}: not JSON ({exc})") from exc
    # predict.py names images by file stem; the GT built here numbers them 1..N.
    results = [{**r, "image_id": image_id[r["image_id"]]} for r in all_results if r.get("image_id") in image_id]
    ignored = len(all_results) - len(results)

    if ignored:
        print(f"note: {ignored} result(s) in {pred_json} name images not scored here; ignored", file=sys.stderr)

    report = evaluate_predictions(gt, results, max_dets, iou_types=("segm",), class_names=dataset.class_names)
    per_image = {item.name: _score_image(item, i, gt, results, pred_dir, max_dets)
                 for item, i in zip(dataset.items, dataset.image_ids)}
    values = list(per_image.values())

    def mean(key: str) -> float:
        return float(sum(v[key] for v in values) / len(values)) if values else 0.0

    metrics = {"segm_AP": report["coco"]["segm"]["AP"], "segm_AP50": report["coco"]["segm"]["AP50"],
               "segm_AP75": report["coco"]["segm"]["AP75"],
               "sartorius": mean("sartorius"), "aji": mean("aji"),
               "num_gt": sum(v["num_gt"] for v in values), "num_pred": sum(v["num_pred"] for v in values),
               # predictions.json's masks overlap and include scores < the label images' threshold
               "sartorius_from_json": report["sartorius"]["score"]}
    return {"gt_dir": str(gt_dir), "pred_dir": str(pred_dir), "max_dets": max_dets,
            "ignored_results": ignored, "metrics": metrics, "per_image": per_image}


# ------------------------------------------------------------------------------- report


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def gpu_model() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def format_table(scores: dict) -> str:
    rows = [f"{'image':26s} {'organ':9s} {'GT':>5s} {'pred':>5s} {'dets':>5s} {'AP':>6s} {'AP50':>6s} "
            f"{'DSB':>6s} {'AJI':>6s}"]
    for name, v in scores["per_image"].items():
        rows.append(f"{name:26s} {v['organ']:9s} {v['num_gt']:5d} {v['num_pred']:5d} {v['num_detections']:5d} "
                    f"{v['segm_AP']:6.3f} {v['segm_AP50']:6.3f} {v['sartorius']:6.3f} {v['aji']:6.3f}")
    m = scores["metrics"]
    dets = sum(v["num_detections"] for v in scores["per_image"].values())
    rows.append(f"{'all (AP pooled; DSB, AJI mean)':36s} {m['num_gt']:5d} {m['num_pred']:5d} {dets:5d} "
                f"{m['segm_AP']:6.3f} {m['segm_AP50']:6.3f} {m['sartorius']:6.3f} {m['aji']:6.3f}")
    return "\n".join(rows)


def format_training(train: dict) -> str:
    parts = [f"wall {train['wall_s']:.0f} s", f"{train.get('iterations', '?')} iterations"]
    if train.get("s_per_iter"):
        parts.append(f"{train['s_per_iter']:.3f} s/iter overall")
    if train.get("s_per_iter_logged"):
        parts.append(f"{train['s_per_iter_logged']:.3f} s/iter logged")
    parts.append(f"peak RSS {train['peak_rss_mb'] / 1024:.2f} GiB")
    return "train: " + ", ".join(parts)


def base_record() -> dict:
    return {"benchmark": "monuseg", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": platform.node(), "cpu": cpu_model(), "cpu_count": os.cpu_count(), "gpu": gpu_model(),
            "python": platform.python_version()}


def write_record(path: Path, record: dict) -> None:
    from utils.io import write_json_atomic

    write_json_atomic(path, record)
    print(f"record: {path}")


# ------------------------------------------------------------------------------- main


def score_only(args: argparse.Namespace) -> int:
    if not args.pred_dir:
        raise BenchError("--score-only needs --pred-dir (predict.py's output folder)")
    gt_dir = Path(args.gt_dir) if args.gt_dir else Path(args.data_root) / "train"
    names = None if args.gt_dir else list(VAL_IMAGES)
    scores = score_predictions(gt_dir, args.pred_dir, names, args.max_dets)
    print(format_table(scores))
    out = Path(args.out) if args.out else Path(args.pred_dir) / "monuseg_score.json"
    write_record(out, {**base_record(), "mode": "score-only", **scores})
    return 0


def benchmark(args: argparse.Namespace, train_flags: list[str]) -> int:
    data_root = Path(args.data_root)
    train_names, val_names = split_names(data_root)
    work_dir = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="monuseg-bench-"))
    work_dir = work_dir.resolve()
    name = args.name or f"monuseg-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, pred_dir = work_dir / "runs" / name, work_dir / "pred" / name
    if run_dir.exists():
        raise BenchError(f"{run_dir}: exists; choose another --name (train.py would write into it)")
    prepare_work_dir(data_root, work_dir, train_names, val_names)
    out = Path(args.out) if args.out else work_dir / "monuseg_result.json"
    print(f"work dir {work_dir}: {len(train_names)} training, {len(val_names)} validation images")

    record = {**base_record(), "mode": "benchmark", "budget": args.max_time, "train_flags": train_flags,
              "name": name, "work_dir": str(work_dir), "data_root": str(data_root),
              "val_images": val_names, "train_images": train_names}
    command = train_command(work_dir, name, args.max_time, train_flags)
    record["train_command"] = command
    print("$ " + " ".join(command), flush=True)
    train = run_measured(command, REPO)
    train.update(read_run(run_dir))
    if train.get("iterations"):
        train["s_per_iter"] = round(train["wall_s"] / train["iterations"], 4)
    max_time = (train.get("config") or {}).get("max_time")
    if max_time:
        train["over_budget_s"] = round(max(0.0, train["wall_s"] - float(max_time)), 1)
    record["train"] = train
    if train["returncode"] != 0:
        record["error"] = f"train.py exited with status {train['returncode']}"
        write_record(out, record)
        raise BenchError(f"{record['error']}; see {run_dir / 'train.log'}")

    checkpoint = run_dir / f"{args.checkpoint}.pth"
    if not checkpoint.is_file():
        checkpoint = run_dir / "last.pth"
    command = predict_command(work_dir / "val" / "images", checkpoint, pred_dir, args.score_thresh)
    record["predict_command"] = command
    print("$ " + " ".join(command), flush=True)
    record["predict"] = {**run_measured(command, REPO), "checkpoint": str(checkpoint),
                         "score_thresh": args.score_thresh}
    if record["predict"]["returncode"] != 0:
        record["error"] = f"predict.py exited with status {record['predict']['returncode']}"
        write_record(out, record)
        raise BenchError(record["error"])

    scores = score_predictions(work_dir / "val", pred_dir, None, args.max_dets)
    record.update(scores)
    print(format_training(train))
    print(format_table(scores))
    write_record(out, record)
    return 0


def main(argv: list[str] | None = None) -> int:
    ours, train_flags = split_argv(sys.argv[1:] if argv is None else argv)
    parser = get_args_parser()
    args = parser.parse_args(ours)
    if train_flags and args.score_only:
        parser.error("train.py flags after -- have no effect with --score-only")
    from datasets.errors import DatasetError  # here, not at the top: --help stays quick (no torch)

    try:
        return score_only(args) if args.score_only else benchmark(args, train_flags)
    except (BenchError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
