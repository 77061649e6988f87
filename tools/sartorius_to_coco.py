#!/usr/bin/env python
"""Sartorius train.csv → COCO JSON (compressed RLE), for the whole set and each fold.

    python tools/sartorius_to_coco.py --data-path /data/sartorius --out /data/sartorius/coco --num-folds 5

Writes ``all.json`` and ``fold{i}_train.json`` / ``fold{i}_val.json`` (folds grouped by sample_id
and stratified by cell type, exactly as ``--dataset sartorius --num-folds K --fold i``). Image ids
are 1-based positions in the sorted image list, the same in every file and in the dataset;
``file_name`` is ``<id>.png`` (relative to ``train/``). Categories: 1 shsy5y, 2 astro, 3 cort.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.errors import DatasetError  # noqa: E402
from datasets.sartorius import SartoriusDataset, index_folds, read_index  # noqa: E402
from metrics.validation import subset_ground_truth  # noqa: E402
from utils.io import write_json_atomic  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True, help="folder with train.csv and train/")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-folds", type=int, default=5, help="0 writes all.json only")
    p.add_argument("--fold-seed", type=int, default=0)
    p.add_argument("--keep-duplicates", action="store_true", help="keep exact duplicate annotations")
    p.add_argument("--skip-bad", action="store_true", help="skip bad rows/images instead of stopping")
    return p


def main(args: argparse.Namespace) -> int:
    try:
        index = read_index(os.path.join(args.data_path, "train.csv"), os.path.join(args.data_path, "train"),
                           drop_duplicates=not args.keep_duplicates, skip_bad=args.skip_bad)
        dataset = SartoriusDataset(index, list(range(len(index.names))), skip_bad=args.skip_bad)
        gt = dataset.coco_gt()
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json_atomic(os.path.join(args.out, "all.json"), gt, indent=None)
    print(f"all.json: {len(gt['images'])} images, {len(gt['annotations'])} annotations "
          f"({index.log.summary()})")
    if args.num_folds >= 2:
        folds = index_folds(index, args.num_folds, args.fold_seed)
        for fold in range(args.num_folds):
            val_ids = {p + 1 for p in range(len(folds)) if folds[p] == fold}
            train_ids = {p + 1 for p in range(len(folds))} - val_ids
            for split, ids in (("train", train_ids), ("val", val_ids)):
                part = subset_ground_truth(gt, ids)
                write_json_atomic(os.path.join(args.out, f"fold{fold}_{split}.json"), part, indent=None)
                print(f"fold{fold}_{split}.json: {len(part['images'])} images, {len(part['annotations'])} annotations")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
