#!/usr/bin/env python
"""One row per experiment or run under a runs directory: the sheet teams kept by hand.

    python tools/runs_table.py runs/ [--csv runs/runs_table.csv] [--sort date|cv_pp|cv_raw]

An experiment is a directory with ``metadata.json`` (tools/cross_validate.py): its row has the
CV scores, raw and post-processed, and its comment; its fold directories are not listed apart.
A run is any other directory with ``config.json`` (train.py): its score is that of its final
validation (``report.json``, else the last evaluation, ``eval_report.json``), with no
post-processed score. Columns: date, kind, name, dataset, model, folds, key flags, cv_raw
(Sartorius score), cv_pp, segm_AP, comment, path. The table is printed and written as CSV.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.io import write_text_atomic  # noqa: E402

COLUMNS = ("date", "kind", "name", "dataset", "model", "folds", "key_flags", "cv_raw", "cv_pp", "segm_AP",
           "comment", "path")
# The settings that tell runs apart at a glance (all of them are in each run's config.json).
KEY_OPTIONS = (("epochs", "epochs"), ("max_time", "max-time"), ("batch_size", "b"), ("opt", "opt"), ("lr", "lr"),
               ("lr_scheduler", "sched"), ("data_augmentation", "aug"), ("input_scale", "scale"),
               ("min_size", "min-size"), ("weights", "weights"), ("weights_backbone", "weights-backbone"),
               ("amp", "amp"))
MAX_DEPTH = 4


def key_flags(config: dict) -> str:
    """``epochs=12 b=4 opt=adamw …`` from a resolved config (unset options left out)."""
    parts = []
    scaled = config.get("input_scale") is not None
    for key, label in KEY_OPTIONS:
        value = config.get(key)
        if value in (None, False, "") or (key == "min_size" and scaled):
            continue
        parts.append(label if value is True else f"{label}={value}")
    return " ".join(parts)


def _read(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"warning: {path}: unreadable ({exc}); row left incomplete", file=sys.stderr)
        return None
    return value if isinstance(value, dict) else None


def _mtime(path: Path) -> str:
    return datetime.datetime.fromtimestamp(path.stat().st_mtime).astimezone().isoformat(timespec="seconds")


def _folds_text(dataset: dict, folds: dict) -> str:
    num = dataset.get("num_folds")
    return f"{len(folds)}/{num}" if num else ""


def experiment_row(directory: Path, root: Path) -> dict:
    meta = _read(directory / "metadata.json") or {}
    config = meta.get("config") or {}
    dataset = meta.get("dataset") or {}
    return {"date": meta.get("date") or _mtime(directory / "metadata.json"), "kind": "cv", "name": directory.name,
            "dataset": dataset.get("dataset") or config.get("dataset"), "model": config.get("model"),
            "folds": _folds_text(dataset, meta.get("folds") or {}), "key_flags": key_flags(config),
            "cv_raw": meta.get("cv_raw"), "cv_pp": meta.get("cv_pp"), "segm_AP": meta.get("cv_raw_segm_AP"),
            "comment": meta.get("comment") or "", "path": str(directory.relative_to(root))}


def run_row(directory: Path, root: Path) -> dict:
    config = _read(directory / "config.json") or {}
    score = segm = None
    for name in ("report.json", "eval_report.json"):
        if (directory / name).is_file():
            report = _read(directory / name) or {}
            score = (report.get("sartorius") or {}).get("score")
            segm = ((report.get("coco") or {}).get("segm") or {}).get("AP")
            break
    options = config.get("dataset_options") or {}
    fold = f"fold {options['fold']}/{options['num_folds']}" if options.get("num_folds") and "fold" in options else ""
    return {"date": _mtime(directory / "config.json"), "kind": "run", "name": directory.name,
            "dataset": config.get("dataset"), "model": config.get("model"), "folds": fold,
            "key_flags": key_flags(config), "cv_raw": score, "cv_pp": None, "segm_AP": segm, "comment": "",
            "path": str(directory.relative_to(root))}


def collect_rows(root: str | os.PathLike) -> list[dict]:
    """Rows of every experiment and run under ``root`` (experiments' own runs folded into them)."""
    root = Path(root)
    rows: list[dict] = []

    def visit(directory: Path, depth: int) -> None:
        if (directory / "metadata.json").is_file():
            rows.append(experiment_row(directory, root))
            return
        if (directory / "config.json").is_file():
            rows.append(run_row(directory, root))
            return
        if depth < MAX_DEPTH:
            for child in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
                visit(child, depth + 1)

    visit(root, 0)
    return rows


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    """Aligned text table (the comment and path columns last, unpadded)."""
    shown = [c for c in COLUMNS if c != "path"]
    cells = [[_cell(r.get(c)) for c in shown] for r in rows]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(shown)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(shown, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells]
    return "\n".join(lines)


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: "" if r.get(c) is None else r.get(c) for c in COLUMNS})
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_dir", nargs="?", default="runs", help="directory of experiments and runs")
    parser.add_argument("--csv", default=None, help="CSV path (default: RUNS_DIR/runs_table.csv)")
    parser.add_argument("--sort", default="date", choices=("date", "cv_raw", "cv_pp"),
                        help="row order (scores: best first)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.runs_dir):
        print(f"error: {args.runs_dir}: not a directory (train.py writes runs under --output-dir, default runs/)",
              file=sys.stderr)
        return 2
    rows = collect_rows(args.runs_dir)
    if args.sort == "date":
        rows.sort(key=lambda r: str(r["date"]))
    else:
        rows.sort(key=lambda r: (r[args.sort] is None, -(r[args.sort] or 0.0)))
    print(format_table(rows) if rows else f"no experiments or runs under {args.runs_dir}")
    csv_path = args.csv or os.path.join(args.runs_dir, "runs_table.csv")
    write_text_atomic(csv_path, to_csv(rows))
    print(f"{len(rows)} row(s) → {csv_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
