"""Patient-level data splits: items (scans) of one patient never land in two splits.

A patient key of None, NaN or "" means "unknown patient": that item is its own patient. Patients are sorted
by key before any shuffling, so a split depends on the set of items and the seed, not on manifest row order.
Returned id lists keep the input order of ``item_ids``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import KFold


def _group_by_patient(item_ids: Sequence[str], patient_keys: Sequence[object]) -> dict[str, list[str]]:
    """Sorted patient key -> its item ids (input order). Missing keys become ``item:<id>``."""
    if len(item_ids) != len(patient_keys):
        raise ValueError(f"item_ids ({len(item_ids)}) and patient_keys ({len(patient_keys)}) differ in length")
    if len(set(item_ids)) != len(item_ids):
        raise ValueError("item_ids must be unique; duplicates: "
                         f"{sorted({i for i in item_ids if list(item_ids).count(i) > 1})}")
    groups: dict[str, list[str]] = {}
    for item, key in zip(item_ids, patient_keys):
        missing = key is None or key == "" or (isinstance(key, float) and math.isnan(key))
        groups.setdefault(f"item:{item}" if missing else f"patient:{key}", []).append(str(item))
    return dict(sorted(groups.items()))


def _items(groups: dict[str, list[str]], patients: Sequence[str], order: Sequence[str]) -> list[str]:
    chosen = {item for p in patients for item in groups[p]}
    return [str(i) for i in order if str(i) in chosen]


def holdout_split(item_ids: Sequence[str], patient_keys: Sequence[object], test_fraction: float,
                  seed: int = 0) -> tuple[list[str], list[str]]:
    """(train_ids, test_ids): round(test_fraction * patients) patients (at least 1) held out for testing.

    Needs at least 2 patients; at least one patient always stays in train.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    groups = _group_by_patient(item_ids, patient_keys)
    patients = list(groups)
    if len(patients) < 2:
        raise ValueError(f"a holdout split needs at least 2 patients, got {len(patients)}")
    n_test = min(max(1, round(test_fraction * len(patients))), len(patients) - 1)
    shuffled = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    return _items(groups, shuffled[n_test:], item_ids), _items(groups, shuffled[:n_test], item_ids)


def kfold_splits(item_ids: Sequence[str], patient_keys: Sequence[object], n_folds: int = 5, seed: int = 42,
                 n_val: int = 1, train_cases: int | None = None) -> list[dict[str, list[str]]]:
    """K-fold cross-validation over patients: ``KFold(n_folds, shuffle=True, random_state=seed)``.

    Each fold is ``{"train": [...], "val": [...], "test": [...]}`` of item ids. Every patient is in exactly
    one test fold. Of the other patients, ``n_val`` (chosen with a seeded shuffle) go to validation and the
    rest to training; ``train_cases`` keeps only the first N training patients of that same shuffle, so
    smaller training sets are subsets of larger ones (label-efficiency curves).
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if n_val < 0:
        raise ValueError(f"n_val must be >= 0, got {n_val}")
    groups = _group_by_patient(item_ids, patient_keys)
    patients = np.array(list(groups), dtype=object)
    if len(patients) < n_folds:
        raise ValueError(f"{n_folds} folds need at least {n_folds} patients, got {len(patients)}")
    folds = []
    for fold, (rest_idx, test_idx) in enumerate(KFold(n_folds, shuffle=True, random_state=seed).split(patients)):
        rest = list(patients[rest_idx][np.random.default_rng([seed, fold]).permutation(len(rest_idx))])
        val, train = rest[:n_val], rest[n_val:]
        if not train:
            raise ValueError(f"fold {fold}: {len(rest)} non-test patients leave none for training with "
                             f"n_val={n_val}; use fewer folds, a smaller n_val or more patients")
        if train_cases is not None:
            if not 1 <= train_cases <= len(train):
                raise ValueError(f"train_cases must be in [1, {len(train)}] (training patients in fold "
                                 f"{fold}), got {train_cases}")
            train = train[:train_cases]
        folds.append({"train": _items(groups, train, item_ids), "val": _items(groups, val, item_ids),
                      "test": _items(groups, list(patients[test_idx]), item_ids)})
    return folds
