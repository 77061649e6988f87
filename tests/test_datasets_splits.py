"""Grouped, stratified k-fold and random hold-out splits."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datasets.errors import DatasetError
from datasets.splits import grouped_stratified_folds, random_split


@settings(max_examples=30, deadline=None, database=None)
@given(st.lists(st.tuples(st.integers(0, 15), st.integers(1, 4)), min_size=1, max_size=40),
       st.integers(2, 5), st.integers(0, 3))
def test_groups_never_straddle_folds(spec, k, seed):
    groups, strata = [], []
    for g, count in spec:
        groups += [f"g{g}"] * count
        strata += [f"type{g % 3}"] * count       # one type per group, like a Sartorius sample
    folds = grouped_stratified_folds(groups, strata, k, seed)
    assert folds.dtype == np.int64 and folds.min() >= 0 and folds.max() < k
    for g in set(groups):
        assert len({folds[i] for i in range(len(groups)) if groups[i] == g}) == 1
    assert np.array_equal(folds, grouped_stratified_folds(groups, strata, k, seed))


def test_strata_balanced():
    # 3 types × 10 samples × 2 frames, 5 folds: every fold gets 2 samples (4 images) of each type.
    groups = [f"{t}_{s}" for t in "abc" for s in range(10) for _ in range(2)]
    strata = [g[0] for g in groups]
    folds = grouped_stratified_folds(groups, strata, 5, seed=0)
    for t in "abc":
        counts = np.bincount(folds[[s == t for s in strata]], minlength=5)
        assert counts.tolist() == [4] * 5
    assert not np.array_equal(folds, grouped_stratified_folds(groups, strata, 5, seed=1))


def test_random_split():
    a = random_split(10, 0.3, seed=0)
    assert a.sum() == 3 and np.array_equal(a, random_split(10, 0.3, seed=0))
    assert random_split(3, 0.01).sum() == 1 and random_split(5, 0.0).sum() == 0
    with pytest.raises(DatasetError, match="val_fraction"):
        random_split(5, 1.0)
    with pytest.raises(DatasetError, match="num_folds"):
        grouped_stratified_folds(["a"], ["x"], 1)
