"""Patient-level hold-out and k-fold splits."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import KFold

from pipeline.evaluation.splits import holdout_split, kfold_splits


def _corpus():
    """32 items / 30 patients: case00a+case00b and case01a+case01b share a patient; 4 items have no key."""
    items, keys = [], []
    for p in range(26):
        suffixes = "ab" if p < 2 else "a"
        for s in suffixes:
            items.append(f"case{p:02d}{s}")
            keys.append(f"patient{p:02d}")
    items += ["anon0", "anon1", "anon2", "anon3"]
    keys += [None, float("nan"), "", None]
    return items, keys


def _patient_of(items, keys):
    return {i: (k if isinstance(k, str) and k else f"own:{i}") for i, k in zip(items, keys)}


def test_kfold_is_patient_level_and_covers_every_item_once():
    items, keys = _corpus()
    patient = _patient_of(items, keys)
    folds = kfold_splits(items, keys, n_folds=5, seed=42, n_val=1)
    assert len(folds) == 5
    tested = [i for f in folds for i in f["test"]]
    assert sorted(tested) == sorted(items)                      # every item in exactly one test fold
    for f in folds:
        assert sorted(f["train"] + f["val"] + f["test"]) == sorted(items)
        owners = {name: {patient[i] for i in f[name]} for name in ("train", "val", "test")}
        assert not owners["train"] & owners["val"] and not owners["train"] & owners["test"]
        assert not owners["val"] & owners["test"]
        assert len(owners["val"]) == 1 and len(owners["test"]) == 6 and len(owners["train"]) == 23
        for name in ("train", "val", "test"):                   # the 2-case patients stay together
            assert ("case00a" in f[name]) == ("case00b" in f[name])
            assert ("case01a" in f[name]) == ("case01b" in f[name])


def test_kfold_matches_sklearn_over_sorted_patients_btcv_sizes():
    items = [f"img{i:04d}" for i in range(1, 31)]
    folds = kfold_splits(items, items, n_folds=5, seed=42)
    for f, (_, test_idx) in zip(folds, KFold(5, shuffle=True, random_state=42).split(items)):
        assert f["test"] == [items[i] for i in test_idx]
        assert (len(f["train"]), len(f["val"]), len(f["test"])) == (23, 1, 6)


def test_kfold_is_deterministic_and_seeded():
    items, keys = _corpus()
    assert kfold_splits(items, keys, seed=42) == kfold_splits(items, keys, seed=42)
    assert kfold_splits(items, keys, seed=42) != kfold_splits(items, keys, seed=7)
    shuffled = np.random.default_rng(0).permutation(len(items))   # manifest row order does not matter
    a = kfold_splits(items, keys)
    b = kfold_splits([items[i] for i in shuffled], [keys[i] for i in shuffled])
    assert [sorted(f["test"]) for f in a] == [sorted(f["test"]) for f in b]


def test_train_cases_keeps_nested_subsets_of_training_patients():
    items, keys = _corpus()
    patient = _patient_of(items, keys)
    full = kfold_splits(items, keys)
    small = kfold_splits(items, keys, train_cases=3)
    medium = kfold_splits(items, keys, train_cases=10)
    for f, s, m in zip(full, small, medium):
        assert len({patient[i] for i in s["train"]}) == 3 and len({patient[i] for i in m["train"]}) == 10
        assert set(s["train"]) <= set(m["train"]) <= set(f["train"])
        assert s["val"] == f["val"] and s["test"] == f["test"]
    with pytest.raises(ValueError, match=r"train_cases must be in \[1, 23\]"):
        kfold_splits(items, keys, train_cases=24)


def test_kfold_errors():
    with pytest.raises(ValueError, match="5 folds need at least 5 patients, got 4"):
        kfold_splits(["a", "b", "c", "d", "e"], ["p1", "p1", "p2", "p3", "p4"])
    with pytest.raises(ValueError, match="none for training"):
        kfold_splits(list("abc"), list("abc"), n_folds=3, n_val=2)
    with pytest.raises(ValueError, match="differ in length"):
        kfold_splits(list("abc"), list("ab"))
    with pytest.raises(ValueError, match="unique"):
        kfold_splits(list("aab"), list("xyz"))
    with pytest.raises(ValueError, match="n_folds must be >= 2"):
        kfold_splits(list("abc"), list("abc"), n_folds=1)


def test_holdout_split_is_patient_level_and_deterministic():
    items, keys = _corpus()
    patient = _patient_of(items, keys)
    train, test = holdout_split(items, keys, test_fraction=0.34, seed=0)
    assert sorted(train + test) == sorted(items)
    assert not {patient[i] for i in train} & {patient[i] for i in test}
    assert len({patient[i] for i in test}) == round(0.34 * 30)
    assert [i for i in items if i in test] == test               # input order kept
    assert holdout_split(items, keys, 0.34, seed=0) == (train, test)
    assert holdout_split(items, keys, 0.34, seed=1) != (train, test)
    tiny_train, tiny_test = holdout_split(["a", "b"], ["p", "q"], test_fraction=0.01)
    assert len(tiny_train) == 1 and len(tiny_test) == 1         # at least one patient each side
    with pytest.raises(ValueError, match="at least 2 patients, got 1"):
        holdout_split(["a", "b"], ["p", "p"], 0.5)
    with pytest.raises(ValueError, match="test_fraction"):
        holdout_split(items, keys, 1.0)
