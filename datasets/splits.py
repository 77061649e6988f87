"""Deterministic train/val splits: grouped stratified k-fold and random fractions.

Grouping keeps all items of a group (e.g. the time-lapse frames of one Sartorius
``sample_id``) on one side of the split, so validation never sees a near-copy of a training
image. Stratifying balances a label (cell type) across folds.
"""
from __future__ import annotations

import zlib
from collections import Counter, defaultdict
from typing import Hashable, Sequence

import numpy as np

from datasets.errors import DatasetError


def _rng(seed: int, salt: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{salt}:{seed}".encode()))


def grouped_stratified_folds(groups: Sequence[Hashable], strata: Sequence[Hashable], num_folds: int,
                             seed: int = 0) -> np.ndarray:
    """Fold index (int64 ``N``, in ``0..num_folds-1``) for each of ``N`` items.

    Items sharing a group always share a fold. Each group's stratum is its most common
    stratum (ties: smallest name). Within each stratum, groups are shuffled with ``seed`` and
    then dealt largest first to the fold holding the fewest items of that stratum so far,
    so per-stratum item counts are balanced across folds. Same inputs and seed → same folds.
    """
    if num_folds < 2:
        raise DatasetError(f"num_folds must be ≥ 2, got {num_folds}")
    if len(groups) != len(strata):
        raise ValueError("groups and strata must have the same length")
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    by_stratum: dict[Hashable, list[Hashable]] = defaultdict(list)
    for g, idx in members.items():
        counts = Counter(strata[i] for i in idx)
        top = max(counts.values())
        by_stratum[min(str(s) for s, c in counts.items() if c == top)].append(g)

    folds = np.zeros(len(groups), dtype=np.int64)
    fold_sizes = np.zeros(num_folds, dtype=np.int64)       # all strata: tie-breaker
    for stratum in sorted(by_stratum):
        group_list = sorted(by_stratum[stratum], key=str)
        order = _rng(seed, f"folds:{stratum}").permutation(len(group_list))
        # Stable sort by size (descending) after the shuffle: equal-sized groups stay shuffled.
        shuffled = [group_list[k] for k in order]
        shuffled.sort(key=lambda g: -len(members[g]))
        sizes = np.zeros(num_folds, dtype=np.int64)
        for g in shuffled:
            f = int(np.lexsort((np.arange(num_folds), fold_sizes, sizes))[0])
            folds[members[g]] = f
            sizes[f] += len(members[g])
            fold_sizes[f] += len(members[g])
    return folds


def check_fold(num_folds: int, fold: int) -> None:
    if num_folds < 2:
        raise DatasetError(f"num_folds must be ≥ 2, got {num_folds}")
    if not 0 <= fold < num_folds:
        raise DatasetError(f"fold must be in 0..{num_folds - 1}, got {fold}")


def fold_positions(num_items: int, split: str, num_folds: int, fold: int, seed: int = 0,
                   groups: Sequence[Hashable] | None = None, strata: Sequence[Hashable] | None = None) -> list[int]:
    """Item positions of ``split`` (``"train"``: every fold but ``fold``; ``"val"``: fold ``fold``).

    Folds come from ``grouped_stratified_folds``; without ``groups`` every item is its own
    group, without ``strata`` all items share one. Same inputs and seed → same positions, so
    "train" and "val" of one fold partition the items, and the "val" splits of folds
    ``0..num_folds-1`` cover every item exactly once.
    """
    check_fold(num_folds, fold)
    if num_items < num_folds:
        raise DatasetError(f"{num_items} images cannot make {num_folds} folds: lower num_folds")
    groups = list(range(num_items)) if groups is None else groups
    strata = [0] * num_items if strata is None else strata
    folds = grouped_stratified_folds(groups, strata, num_folds, seed)
    if not (folds == fold).any():
        raise DatasetError(f"fold {fold} of {num_folds} is empty ({len(set(groups))} groups): lower num_folds")
    chosen = folds == fold if split == "val" else folds != fold
    return np.flatnonzero(chosen).tolist()


def random_split(num_items: int, val_fraction: float, seed: int = 0) -> np.ndarray:
    """Bool ``N``: True for validation items; ``round(N * val_fraction)`` of them (at least one
    when the fraction is > 0 and N ≥ 2), chosen by ``seed`` deterministically."""
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    is_val = np.zeros(num_items, dtype=bool)
    n_val = int(round(num_items * val_fraction))
    if val_fraction > 0 and num_items >= 2:
        n_val = min(max(n_val, 1), num_items - 1)
    is_val[_rng(seed, "val")
           .permutation(num_items)[:n_val]] = True
    return is_val
