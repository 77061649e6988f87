#!/usr/bin/env python
"""Instance-mask folders → one COCO JSON (compressed RLE, one category).

    python tools/masks_to_coco.py --data-path /data/cells --out /data/cells/annotations.json

Accepts both layouts of ``--dataset folder``: ``images/NAME.*`` + ``masks/NAME.*`` label images
(0 background, each other value one instance, 8/16-bit) and ``ID/images/ID.png`` +
``ID/masks/*.png`` (one binary file per instance). ``file_name`` is relative to ``--data-path``,
so ``--dataset coco --train-images DATA_PATH`` reads the result directly.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.errors import BadInputLog, DatasetError  # noqa: E402
from datasets.folder import FolderDataset, scan_folder  # noqa: E402
from utils.io import write_json_atomic  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", required=True)
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument("--class-name", default="cell")
    p.add_argument("--skip-bad", action="store_true", help="skip images with missing/unreadable files")
    return p


def main(args: argparse.Namespace) -> int:
    log = BadInputLog()
    try:
        items = scan_folder(args.data_path, skip_bad=args.skip_bad, log=log)
        gt = FolderDataset(items, class_name=args.class_name, log=log).coco_gt()
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for message in log.skipped:
        print(f"skipped: {message}", file=sys.stderr)
    write_json_atomic(args.out, gt, indent=None)
    print(f"{args.out}: {len(gt['images'])} images, {len(gt['annotations'])} annotations")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
