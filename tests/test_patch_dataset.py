"""Ray Data patch dataset: equal batches per worker, body-centred patches, scanner balance, determinism."""

import threading

import numpy as np
import pandas as pd
import pytest

from conftest import write_tiny_corpus
from pipeline.config import UserError
from pipeline.data.inputs import PAD_HU, scale_hu
from pipeline.data.patches import cut_patch, load_volume_refs
from pipeline.distributed.patch_dataset import (PatchCutter, decode_descriptors, equal_shards, patch_dataset,
                                                rank_batches, volume_weights)

SIZE, WINDOW = (8, 8, 8), (-500.0, 500.0)


def scanner_corpus(root):
    """4 volumes: three from scanner A, one (v3) from scanner B."""
    write_tiny_corpus(root, n=4)
    df = pd.read_parquet(root / "manifest.parquet")
    df.loc[df.item_id.isin(["v0", "v1", "v2"]), "scanner_key"] = "A"
    df.loc[df.item_id == "v3", "scanner_key"] = "B"
    df.to_parquet(root / "manifest.parquet")
    return root


def cutter(root, seed=0, balance=False, ranks=(0, 1), steps=4, batch=3):
    return PatchCutter(str(root), SIZE, WINDOW, seed, list(ranks), 0, steps, batch, balance, 0.0, None)


# ------------------------------------------------------------------------------------ pure parts (no Ray)
def test_volume_weights_balance_scanners():
    np.testing.assert_allclose(volume_weights(["A", "A", "A", "B"], False), [0.25] * 4)
    np.testing.assert_allclose(volume_weights(["A", "A", "A", "B"], True), [1 / 6, 1 / 6, 1 / 6, 0.5])
    with pytest.raises(ValueError, match="no volumes"):
        volume_weights([], True)


def test_descriptors_are_rank_major_and_cover_each_step():
    d = decode_descriptors(np.arange(2 * 3 * 2), ranks=[0, 1], start_step=10, steps_per_epoch=3, batch_size=2)
    assert d["rank"].tolist() == [0] * 6 + [1] * 6
    assert d["step"].tolist() == [10, 10, 11, 11, 12, 12] * 2
    assert d["slot"].tolist() == [0, 1] * 6
    with pytest.raises(ValueError, match="descriptor ids"):
        decode_descriptors(np.array([12]), [0, 1], 0, 3, 2)


def test_patches_are_windowed_cuts_centred_in_the_body(tmp_path):
    root = write_tiny_corpus(tmp_path)
    out = cutter(root)({"id": np.arange(24)})
    assert out["image"].shape == (24, 1, 8, 8, 8) and out["image"].dtype == np.float32
    assert out["coords"].shape == (24, 3, 8, 8, 8) and out["label"].dtype == np.int64
    refs = load_volume_refs(root)                       # volume_index counts the corpus in its read order
    for i in range(24):
        vol = np.load(refs[out["volume_index"][i]].image_path)
        mask = np.load(refs[out["volume_index"][i]].mask_path)
        start = out["start"][i]
        assert mask[tuple(start + 4)] == 1  # the patch centre is a body voxel
        np.testing.assert_array_equal(out["image"][i, 0], scale_hu(cut_patch(vol, start, SIZE, PAD_HU), WINDOW))


def test_cutter_is_a_function_of_seed_and_descriptor(tmp_path):
    root = write_tiny_corpus(tmp_path)
    a = cutter(root, seed=1)({"id": np.arange(12)})
    b = cutter(root, seed=1)({"id": np.arange(12)[::-1].copy()})  # other order, same descriptors
    np.testing.assert_array_equal(a["start"], b["start"][::-1])
    np.testing.assert_array_equal(a["image"], b["image"][::-1])
    c = cutter(root, seed=2)({"id": np.arange(12)})
    assert not np.array_equal(a["start"], c["start"])


def test_bad_arguments_are_user_errors(tmp_path):
    root = write_tiny_corpus(tmp_path)
    with pytest.raises(UserError, match="batch_size must be >= 1, got 0"):
        patch_dataset(root, SIZE, WINDOW, batch_size=0, steps_per_epoch=2, num_workers=2)
    with pytest.raises(UserError, match=r"ranks must be distinct ranks in 0..1.*got \[2\]"):
        patch_dataset(root, SIZE, WINDOW, 2, 2, 2, ranks=[2])
    with pytest.raises(UserError, match="window_hu"):
        patch_dataset(root, SIZE, (100, -100), 2, 2, 2)
    with pytest.raises(UserError, match="anatdiff preprocess"):
        patch_dataset(tmp_path / "nothing", SIZE, WINDOW, 2, 2, 2)


# --------------------------------------------------------------------------------------------- on Ray
@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ray_dataset_equal_batches_per_consumer_and_deterministic(tmp_path, ray_session):
    root = scanner_corpus(tmp_path)
    steps, batch = 5, 3
    ds = patch_dataset(root, SIZE, WINDOW, batch, steps, num_workers=2, seed=7)
    shards, got = equal_shards(ds, 2), {}

    def consume(i):
        got[i] = list(rank_batches(shards[i], batch, keep_descriptors=True))

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join(timeout=240) for t in threads]
    assert [len(got[i]) for i in range(2)] == [steps, steps]  # DDP sees equal batch counts
    assert all(len(b["image"]) == batch for i in range(2) for b in got[i])
    seen = sorted((int(r), int(s), int(k)) for i in range(2) for b in got[i]
                  for r, s, k in zip(b["rank"], b["step"], b["slot"]))
    assert seen == [(r, s, k) for r in range(2) for s in range(steps) for k in range(batch)]
    # one rank's own dataset: batch i is step i, and rows equal the cutter's (a pure function of the seed)
    own = list(rank_batches(patch_dataset(root, SIZE, WINDOW, batch, steps, 2, seed=7, ranks=[1],
                                          rows_per_block=2), batch, keep_descriptors=True))
    assert [b["step"].tolist() for b in own] == [[s] * batch for s in range(steps)]
    expect = cutter(root, seed=7, ranks=[1], steps=steps, batch=batch)({"id": np.arange(steps * batch)})
    np.testing.assert_array_equal(np.concatenate([b["start"] for b in own]), expect["start"])
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in own]), expect["image"])


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ray_dataset_scanner_balance_changes_the_mix(tmp_path, ray_session):
    root = scanner_corpus(tmp_path)

    b_index = [r.item_id for r in load_volume_refs(root)].index("v3")   # v3 is scanner B's only volume

    def share_of_b(balance):
        ds = patch_dataset(root, SIZE, WINDOW, 8, 10, 2, seed=3, balance_scanners=balance, rows_per_block=40)
        vols = np.concatenate([b["volume_index"] for b in rank_batches(ds, 40, keep_descriptors=True)])
        assert len(vols) == 160
        return float(np.mean(vols == b_index))

    assert 0.15 < share_of_b(False) < 0.35  # uniform over volumes: 1/4
    assert 0.40 < share_of_b(True) < 0.60  # balanced over scanners: 1/2
