"""Patch stream: memory-mapped cuts, padding, body-box coordinates, determinism per (seed, rank, step)."""

import numpy as np
import pytest

from conftest import write_tiny_corpus
from pipeline.config import UserError
from pipeline.data.conditioning import bodybox_coords
from pipeline.data.inputs import body_bbox_zyx, scale_hu
from pipeline.data.patches import PatchStream, cut_patch, load_volume_refs, patch_coords, sample_patch


def test_scale_hu_window():
    out = scale_hu(np.array([-2000, -1000, 0, 1000, 3000]), (-1000, 1000))
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1])
    assert out.dtype == np.float32


def test_cut_patch_pads_outside():
    vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    out = cut_patch(vol, np.array([-1, 3, 4]), (3, 3, 3), fill=-7)
    assert out.shape == (3, 3, 3)
    assert (out[0] == -7).all()  # z = -1 lies outside
    assert out[1, 0, 0] == vol[0, 3, 4]
    assert out[1, 2, 0] == -7  # y = 5 outside


def test_refs_skip_rejected_and_find_body_box(tmp_path):
    refs = load_volume_refs(write_tiny_corpus(tmp_path))
    assert sorted(r.item_id for r in refs) == ["v0", "v1", "v2"]                 # "bad" was rejected
    assert [r.content_digest() for r in refs] == sorted(r.content_digest() for r in refs)   # content order
    assert refs[0].body_bbox_zyx() == ((4, 15), (5, 19), (6, 21))


def test_body_bbox_of_a_mask_and_of_an_empty_one():
    mask = np.zeros((4, 5, 6), bool)
    mask[1:3, 2, 0:4] = True
    assert body_bbox_zyx(mask) == ((1, 2), (2, 2), (0, 3))
    assert body_bbox_zyx(np.zeros((4, 5, 6), bool)) == ((0, 3), (0, 4), (0, 5))


def test_coordinates_outside_the_volume_are_zero_for_both_sources(tmp_path):
    """One padding rule: a patch hanging over the volume's edge gets 0 there, learned map or body box;
    inside the volume body-box coordinates are the formula's (outside [0, 1] beyond the body's box)."""
    ref = load_volume_refs(write_tiny_corpus(tmp_path))[0]
    start, size = np.array([-2, 3, 25]), (6, 6, 6)  # z < 0 and x >= 28 lie outside the (20, 24, 28) volume
    inside = np.zeros(size, bool)
    inside[2:, :, :3] = True
    box = patch_coords(ref, start, size)
    formula = bodybox_coords(size, ref.body_bbox_zyx(), start)
    assert box.dtype == np.float32 and box.shape == (3, *size)
    np.testing.assert_array_equal(box[:, inside], formula[:, inside])
    assert (box[:, ~inside] == 0).all() and (formula[:, ~inside] != 0).any()
    learned = np.random.default_rng(0).random((3, *ref.shape_zyx)).astype(np.float32)
    np.save(tmp_path / "coords.npy", learned)
    ref.coords_path = tmp_path / "coords.npy"
    cut = patch_coords(ref, start, size)
    np.testing.assert_array_equal(cut[:, inside], np.stack([cut_patch(learned[c], start, size, -1)
                                                            for c in range(3)])[:, inside])
    assert (cut[:, ~inside] == 0).all()


def test_missing_manifest_is_user_error(tmp_path):
    with pytest.raises(UserError, match="anatdiff preprocess"):
        load_volume_refs(tmp_path)


def test_patch_content_matches_volume(tmp_path):
    refs = load_volume_refs(write_tiny_corpus(tmp_path))
    p = sample_patch(refs[0], (8, 8, 8), (-1000, 1000), np.random.default_rng(1))
    z, y, x = p["start"]
    vol = np.load(refs[0].image_path)
    expect = scale_hu(cut_patch(vol, p["start"], (8, 8, 8), -1024), (-1000, 1000))
    np.testing.assert_array_equal(p["image"][0], expect)
    centre = p["start"] + 4
    assert np.load(refs[0].mask_path)[tuple(centre)] == 1  # centred inside the body
    assert p["label"].dtype == np.int64 and p["coords"].shape == (3, 8, 8, 8)


def test_stream_is_deterministic_per_rank_and_step(tmp_path):
    refs = load_volume_refs(write_tiny_corpus(tmp_path))
    a = PatchStream(refs, (8, 8, 8), (-1000, 1000), seed=3, rank=0)
    b = PatchStream(refs, (8, 8, 8), (-1000, 1000), seed=3, rank=0)
    c = PatchStream(refs, (8, 8, 8), (-1000, 1000), seed=3, rank=1)
    np.testing.assert_array_equal(a.batch(5, 2)["image"], b.batch(5, 2)["image"])
    assert not np.array_equal(a.batch(5, 2)["start"], c.batch(5, 2)["start"])
    assert a.batch(0, 3)["image"].shape == (3, 1, 8, 8, 8)


def test_foreground_sampling_hits_organs(tmp_path):
    refs = load_volume_refs(write_tiny_corpus(tmp_path))
    s = PatchStream(refs, (8, 8, 8), (-1000, 1000), foreground_prob=1.0)
    assert all((s.batch(i, 2)["label"] > 0).any(axis=(1, 2, 3)).all() for i in range(5))


def test_scanner_balance_weights(tmp_path):
    refs = load_volume_refs(write_tiny_corpus(tmp_path))
    s = PatchStream(refs, (8, 8, 8), (-1000, 1000), balance_scanners=True)
    expected = [0.5 if r.item_id == "v0" else 0.25 for r in refs]   # v0 is the only scanner-B volume
    np.testing.assert_allclose(s.p, expected)


def test_foreground_centres_are_class_balanced(tmp_path):
    """Class first, then voxel: a 1-voxel organ is centred as often as a 1000-voxel one."""
    from pipeline.data.patches import VolumeRef, _random_start

    label = np.zeros((20, 20, 20), np.uint8)
    label[2:12, 2:12, 2:12] = 6   # liver: 1000 voxels
    label[15, 15, 15] = 12        # adrenal: 1 voxel
    label[15:17, 2:4, 2:4] = 4    # gallbladder: 8 voxels
    np.save(tmp_path / "lab.npy", label)
    ref = VolumeRef("x", tmp_path / "img.npy", None, tmp_path / "lab.npy", label.shape)
    rng = np.random.default_rng(0)
    hits = [int(label[tuple(_random_start(ref, (4, 4, 4), rng, True) + 2)]) for _ in range(3000)]
    freq = {c: hits.count(c) / len(hits) for c in (4, 6, 12)}
    assert set(hits) == {4, 6, 12}
    for c in (4, 6, 12):
        assert abs(freq[c] - 1 / 3) < 0.04, freq
