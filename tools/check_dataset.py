#!/usr/bin/env python
"""Load a dataset once and report, per file or CSV row, what is wrong; exit 1 on errors.

    python tools/check_dataset.py --dataset sartorius --data-path /data/sartorius
    python tools/check_dataset.py --dataset coco --train-ann livecell_train.json --train-images images/
    python tools/check_dataset.py --dataset folder --data-path /data/cells --val-path /data/cells_val

Errors: unreadable/missing image, size mismatch, malformed CSV row, RLE out of range or
unsorted, unknown category, empty mask. Warnings: duplicates, degenerate boxes, empty mask
files, images without instances (``--strict`` makes warnings fail too).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.checks import CHECKS  # noqa: E402
from datasets.errors import DatasetError  # noqa: E402
from datasets.registry import parse_option  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted(CHECKS))
    p.add_argument("--data-path")
    for key in ("train-ann", "val-ann", "train-images", "val-images", "train-csv", "image-dir", "val-path",
                "class-name"):
        p.add_argument(f"--{key}")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other dataset option key (repeatable)")
    p.add_argument("--max-problems", type=int, default=200, help="problems printed (all are counted)")
    p.add_argument("--strict", action="store_true", help="exit non-zero on warnings too")
    return p


def options_from_args(args: argparse.Namespace) -> dict:
    options = {k: v for k, v in vars(args).items()
               if v is not None and k not in ("dataset", "option", "max_problems", "strict")}
    for item in args.option:
        try:
            key, value = parse_option(item)
        except ValueError as e:
            raise SystemExit(f"--option: {e}") from None
        options[key] = value
    return options


def main(args: argparse.Namespace) -> int:
    try:
        report = CHECKS[args.dataset](options_from_args(args))
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for severity, where, what in report.problems[:args.max_problems]:
        print(f"{severity}: {where}: {what}")
    if len(report.problems) > args.max_problems:
        print(f"... {len(report.problems) - args.max_problems} more problems not shown")
    print("\n".join(report.summary_lines()))
    if not report.num_errors:
        print_size_recommendation(args.dataset, options_from_args(args))
    failed = report.num_errors or (args.strict and report.num_warnings)
    return 1 if failed else 0


def print_size_recommendation(dataset: str, options: dict) -> None:
    """What train.py would choose from this data for the size options left open."""
    from datasets import build_dataset
    from datasets.statistics import check_objects, recommend_sizes, statistics_from_coco

    try:
        stats = statistics_from_coco(build_dataset(dataset, "train", options).coco_gt())
        check_objects(stats, f"training split of {options.get('data_path') or dataset}")
    except DatasetError as e:
        print(f"sizes: cannot recommend: {e}")
        return
    recommended, reasons = recommend_sizes(stats)
    print(f"training split: {stats.describe()}")
    print("sizes train.py chooses when no size flag is given:")
    for line in reasons:
        print(f"  {line}")
    anchors = ",".join(map(str, recommended["anchor_sizes"]))
    print(f"  as flags: --input-scale {recommended['input_scale']} --anchor-sizes {anchors} "
          f"--detections-per-img {recommended['detections_per_img']} --rpn-pre-nms-top-n-test "
          f"{recommended['rpn_pre_nms_top_n_test']} --rpn-post-nms-top-n-test {recommended['rpn_post_nms_top_n_test']} "
          f"--rpn-test-pixels {recommended['rpn_test_pixels']}")


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
