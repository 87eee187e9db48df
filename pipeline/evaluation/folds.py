"""The evaluation splits of one run: a patient-level holdout or k-fold cross-validation, as a list of folds.

Each fold is ``{"train": [...], "val": [...], "test": [...]}`` of item ids (see ``splits.kfold_splits``). Items
of one patient (same ``patient_key``) are always in the same split; an item without a key is its own patient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from pipeline.evaluation.splits import holdout_split, kfold_splits


def patient_of(item_id: str, key: object) -> str:
    """The patient an item belongs to: its key, or ``item:<id>`` when the key is missing (None, NaN, "")."""
    missing = key is None or key == "" or (isinstance(key, float) and math.isnan(key))
    return f"item:{item_id}" if missing else f"patient:{key}"


def limit_patients(item_ids: Sequence[str], patient_keys: Sequence[object], n_patients: int,
                   seed: int) -> list[str]:
    """Items of ``n_patients`` patients drawn by a seeded shuffle of the sorted patients (input order kept).

    Smaller N give subsets of larger N with the same seed (label-efficiency curves).
    """
    patients = sorted({patient_of(i, k) for i, k in zip(item_ids, patient_keys)})
    if not 1 <= n_patients <= len(patients):
        raise ValueError(f"train_cases must be in [1, {len(patients)}] (training patients), got {n_patients}")
    chosen = {patients[j] for j in np.random.default_rng(seed).permutation(len(patients))[:n_patients]}
    return [str(i) for i, k in zip(item_ids, patient_keys) if patient_of(i, k) in chosen]


def evaluation_folds(item_ids: Sequence[str], patient_keys: Sequence[object], split: str, folds: int = 5,
                     fold_seed: int = 42, val_cases: int = 1, train_cases: int | None = None,
                     test_fraction: float = 0.34, seed: int = 0) -> list[dict[str, list[str]]]:
    """Folds of an evaluation run.

    split "kfold": ``kfold_splits(item_ids, patient_keys, folds, fold_seed, val_cases, train_cases)``.
    split "holdout": one fold, ``holdout_split(..., test_fraction, seed)``, no validation items; with
    ``train_cases`` only that many training patients are kept (``limit_patients``).
    Raises ValueError for too few patients or out-of-range counts.
    """
    if split == "kfold":
        return kfold_splits(item_ids, patient_keys, folds, fold_seed, val_cases, train_cases)
    if split != "holdout":
        raise ValueError(f"split must be 'holdout' or 'kfold', got {split!r}")
    train, test = holdout_split(item_ids, patient_keys, test_fraction, seed=seed)
    if train_cases is not None:
        key_of = dict(zip(map(str, item_ids), patient_keys))
        train = limit_patients(train, [key_of[i] for i in train], train_cases, seed)
    return [{"train": train, "val": [], "test": test}]


def check_disjoint(folds: list[dict[str, list[str]]], patient_of_item: dict[str, str]) -> None:
    """Raise ValueError if a patient appears in two splits of one fold (an invariant of the split code)."""
    for n, fold in enumerate(folds):
        seen: dict[str, str] = {}
        for split, items in fold.items():
            for item in items:
                other = seen.setdefault(patient_of_item[item], split)
                if other != split:
                    raise ValueError(f"fold {n}: patient {patient_of_item[item]} is in both {other} and {split}")
