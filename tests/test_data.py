"""segops.data: synthetic dataset, scribble synthesis, VOC / ScribbleSup loaders, aligned augmentations."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from segops.data import (
    AugmentedDataset,
    DatasetError,
    RandomScaleCropFlip,
    SyntheticScribbles,
    VOCSegmentation,
    connected_components,
    distance_to_boundary,
    read_label_png,
    synthesize_scribbles,
    voc_palette,
)

# ------------------------------------------------------------------------------------------ synthetic


def test_synthetic_is_deterministic_and_index_addressable():
    a = SyntheticScribbles(6, seed=3)
    b = SyntheticScribbles(6, seed=3, cache=False)
    for i in (5, 0, 3):  # any order
        for k in ("image", "mask", "scribble"):
            assert np.array_equal(a.raw(i)[k], b.raw(i)[k])
    c = SyntheticScribbles(6, seed=4)
    assert not np.array_equal(a.raw(0)["image"], c.raw(0)["image"])
    # offset: sample i of an offset dataset is sample offset + i of the plain one
    d = SyntheticScribbles(3, seed=3, offset=2)
    assert np.array_equal(d.raw(1)["mask"], a.raw(3)["mask"])
    s = a[1]
    assert s["image"].shape == (3, 64, 64) and s["image"].dtype == torch.float32
    assert s["mask"].dtype == torch.int64 and s["roi"].shape == (64, 64)
    assert 0 <= float(s["image"].min()) and float(s["image"].max()) <= 255


def test_synthetic_scribble_coverage_and_consistency():
    ds = SyntheticScribbles(24, seed=0)
    cov = []
    for i in range(len(ds)):
        r = ds.raw(i)
        mask, scr = r["mask"].astype(np.int64), r["scribble"].astype(np.int64)
        lab = scr != 255
        cov.append(lab.mean())
        assert np.array_equal(scr[lab], mask[lab])  # scribbles carry the true class
        assert set(np.unique(mask).tolist()) <= set(range(ds.num_classes))
        # every object with a reasonable area gets a scribble, and the background does too
        for c in np.unique(mask):
            comps = connected_components(mask == c)
            for j in range(1, comps.max() + 1):
                if (comps == j).sum() >= 9:
                    assert (lab & (comps == j)).any(), "region of class %d in image %d has no scribble" % (c, i)
        # scribbles stay away from class boundaries (margin 2 by default)
        for c in np.unique(mask):
            d = distance_to_boundary(mask == c)
            assert (d[lab & (mask == c)] >= 2).all()
    assert 0.02 <= float(np.mean(cov)) <= 0.045, np.mean(cov)


def test_synthetic_class_not_given_by_colour():
    # the same class appears in very different colours: colour alone cannot tell the class
    ds = SyntheticScribbles(40, seed=1)
    means = {c: [] for c in range(1, ds.num_classes)}
    for i in range(len(ds)):
        r = ds.raw(i)
        for c in means:
            m = r["mask"] == c
            if m.sum() > 30:
                means[c].append(r["image"][m].mean(0))
    for c, v in means.items():
        assert len(v) >= 3
        assert np.std(np.stack(v), axis=0).mean() > 30, "class %d colours are not varied" % c


def test_synthetic_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        SyntheticScribbles(2, size=8)
    with pytest.raises(ValueError, match="shapes"):
        SyntheticScribbles(2, shapes=("disk", "hexagon"))
    with pytest.raises(IndexError):
        SyntheticScribbles(2).raw(5)


# --------------------------------------------------------------------------------- scribble synthesis


def test_distance_and_components_by_hand():
    m = np.zeros((7, 7), bool)
    m[1:6, 1:6] = True
    d = distance_to_boundary(m)
    assert d[3, 3] == 3 and d[1, 1] == 1 and d[2, 3] == 2 and d[0, 0] == 0
    m2 = np.zeros((5, 6), bool)
    m2[0, 0] = m2[1, 1] = True  # diagonal neighbours: one 8-connected component
    m2[3:5, 4:6] = True
    lab = connected_components(m2)
    assert lab[0, 0] == lab[1, 1] == 1 and lab[4, 5] == 2 and lab.max() == 2 and lab[2, 2] == 0


def test_synthesize_scribbles_on_a_mask():
    mask = np.zeros((60, 80), np.int64)
    mask[10:40, 10:30] = 1  # a box
    mask[45:55, 5:75] = 2  # a long bar
    mask[0:3, :] = 255  # void strip
    rng = np.random.default_rng(0)
    s = synthesize_scribbles(mask, rng, fraction=0.03, margin=2, num_classes=3)
    lab = s != 255
    assert np.array_equal(s[lab], mask[lab])
    assert not lab[0:3].any()  # void never labelled
    for c in (0, 1, 2):
        assert (lab & (mask == c)).any()
    assert 0.01 < lab.mean() < 0.08
    again = synthesize_scribbles(mask, np.random.default_rng(0), fraction=0.03, margin=2, num_classes=3)
    assert np.array_equal(s, again)
    with pytest.raises(ValueError, match="outside"):
        synthesize_scribbles(mask, rng, num_classes=2)
    with pytest.raises(ValueError, match="fraction"):
        synthesize_scribbles(mask, rng, fraction=0.0)


# ----------------------------------------------------------------------------------------- VOC loader


def _save_palette_png(path: str, labels: np.ndarray) -> None:
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(voc_palette(256).reshape(-1).tolist())
    im.save(path)


def _fake_voc(root, n=4, h=20, w=24, with_scribbles=True):
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "JPEGImages"))
    os.makedirs(os.path.join(root, "SegmentationClass"))
    os.makedirs(os.path.join(root, "ImageSets", "Segmentation"))
    if with_scribbles:
        os.makedirs(os.path.join(root, "scribbles"))
    names = ["2007_%06d" % i for i in range(n)]
    masks = {}
    for i, nm in enumerate(names):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(os.path.join(root, "JPEGImages", nm + ".jpg"))
        m = np.zeros((h, w), np.uint8)
        m[4:14, 5:15] = 1 + i % 20
        m[4, 5:15] = 255  # void outline
        _save_palette_png(os.path.join(root, "SegmentationClass", nm + ".png"), m)
        masks[nm] = m
        if with_scribbles:
            s = np.full((h, w), 255, np.uint8)
            s[8, 7:12] = m[8, 8]
            s[17, 2:20] = 0
            _save_palette_png(os.path.join(root, "scribbles", nm + ".png"), s)
    with open(os.path.join(root, "ImageSets", "Segmentation", "train.txt"), "w") as f:
        f.write("\n".join(names[:3]) + "\n")
    with open(os.path.join(root, "ImageSets", "Segmentation", "val.txt"), "w") as f:
        f.write(names[3] + "\n")
    return names, masks


def test_voc_loader_on_fake_tree(tmp_path):
    root = str(tmp_path / "VOC2012")
    names, masks = _fake_voc(root)
    tr = VOCSegmentation(root, "train", scribble_dir="scribbles")
    va = VOCSegmentation(root, "val", synthesize=False)
    assert len(tr) == 3 and len(va) == 1
    s = tr[1]
    assert s["name"] == names[1]
    assert s["image"].shape == (3, 20, 24)
    assert np.array_equal(s["mask"].numpy(), masks[names[1]].astype(np.int64))  # palette -> indices, 255 kept
    assert int((s["mask"] == 255).sum()) == 10
    scr = s["scribble"].numpy()
    assert set(np.unique(scr).tolist()) == {0, 2, 255}
    # no scribble folder: scribbles are synthesized from the masks, deterministically
    syn = VOCSegmentation(root, "train", seed=5)
    a, b = syn[0]["scribble"], VOCSegmentation(root, "train", seed=5)[0]["scribble"]
    assert torch.equal(a, b)
    lab = a != 255
    assert torch.equal(a[lab], syn[0]["mask"][lab])
    # the split list may also sit in the root
    os.rename(os.path.join(root, "ImageSets", "Segmentation", "val.txt"), os.path.join(root, "val.txt"))
    assert len(VOCSegmentation(root, "val")) == 1


def test_voc_rgb_and_grey_masks(tmp_path):
    lab = np.array([[0, 1, 15], [255, 20, 0]], np.uint8)
    rgb_path = str(tmp_path / "rgb.png")
    Image.fromarray(voc_palette(256)[lab]).save(rgb_path)
    assert np.array_equal(read_label_png(rgb_path, 21), lab.astype(np.int64))
    grey_path = str(tmp_path / "grey.png")
    Image.fromarray(lab, mode="L").save(grey_path)  # SBD SegmentationClassAug style
    assert np.array_equal(read_label_png(grey_path, 21), lab.astype(np.int64))
    bad_rgb = str(tmp_path / "badrgb.png")
    Image.fromarray(np.full((2, 2, 3), 7, np.uint8)).save(bad_rgb)
    with pytest.raises(DatasetError, match="not a PASCAL VOC class colour"):
        read_label_png(bad_rgb)


def test_voc_bad_inputs(tmp_path):
    with pytest.raises(DatasetError, match="data root not found"):
        VOCSegmentation(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="wrong VOC folder layout.*JPEGImages"):
        VOCSegmentation(str(tmp_path / "empty"))
    root = str(tmp_path / "VOC")
    names, _ = _fake_voc(root)
    with pytest.raises(DatasetError, match="split list 'trainaug' not found"):
        VOCSegmentation(root, "trainaug")
    with pytest.raises(DatasetError, match="scribble folder"):
        VOCSegmentation(root, "train", scribble_dir="missing")
    # corrupt image
    with open(os.path.join(root, "JPEGImages", names[0] + ".jpg"), "wb") as f:
        f.write(b"not a jpeg at all")
    ds = VOCSegmentation(root, "train")
    with pytest.raises(DatasetError, match="cannot decode image .*%s" % names[0]):
        ds[0]
    # label value >= K other than 255
    _save_palette_png(os.path.join(root, "SegmentationClass", names[1] + ".png"), np.full((20, 24), 30, np.uint8))
    with pytest.raises(DatasetError, match=r"values \[30\] outside \[0, 21\)"):
        ds[1]
    # missing mask file
    os.remove(os.path.join(root, "SegmentationClass", names[2] + ".png"))
    with pytest.raises(DatasetError, match="label file not found"):
        ds[2]


# ------------------------------------------------------------------------------------- augmentations


def _coded_sample(h=30, w=40):
    rng = np.random.default_rng(1)
    blocks = torch.from_numpy(rng.integers(0, 5, (h // 6 + 1, w // 6 + 1))).long()
    mask = blocks.repeat_interleave(6, 0).repeat_interleave(6, 1)[:h, :w].contiguous()
    # the image encodes the label, so alignment after a transform can be checked pixel by pixel
    image = torch.stack([mask.float() * 40, torch.zeros(h, w), torch.arange(w).float().expand(h, w)])
    scribble = torch.where(torch.rand(h, w, generator=torch.Generator().manual_seed(0)) < 0.1, mask, torch.full_like(mask, 255))
    return {"image": image, "mask": mask, "scribble": scribble, "roi": torch.ones(h, w)}


@pytest.mark.parametrize("scale", [(0.5, 0.7), (1.0, 1.0), (1.5, 2.0)])
def test_augmentation_keeps_alignment_and_marks_padding(scale):
    t = RandomScaleCropFlip(crop_size=(36, 36), scale_range=scale, flip=True, fill=(0.0, 0.0, 0.0))
    for seed in range(6):
        out = t(_coded_sample(), np.random.default_rng(seed))
        img, mask, scr, roi = out["image"], out["mask"], out["scribble"], out["roi"]
        assert img.shape == (3, 36, 36) and mask.shape == scr.shape == roi.shape == (36, 36)
        inside = roi > 0.5
        # padded pixels: label 255 and ROI 0
        assert (mask[~inside] == 255).all() and (scr[~inside] == 255).all()
        # nearest-resized labels agree with the label encoded in the (bilinear) image away from label edges
        code = img[0] / 40
        m = mask.float()[None, None]
        mx = torch.nn.functional.max_pool2d(m, 3, 1, 1)[0, 0]
        mn = -torch.nn.functional.max_pool2d(-m, 3, 1, 1)[0, 0]
        sel = inside & (mx == mn)  # away from label edges (where bilinear mixes labels)
        sel[0], sel[-1], sel[:, 0], sel[:, -1] = False, False, False, False  # an edge may lie just outside the crop
        assert sel.sum() > 20
        # float32 bilinear interpolation of a locally constant image (value 40 * label): the weights sum to 1 up to
        # ~2 roundings, so |code - label| <= ~4 eps32 * 255 / 40 ~ 3e-6; 1e-4 still fails on any off-by-one label
        assert torch.allclose(code[sel], mask[sel].float(), atol=1e-4)
        lab = (scr != 255) & sel
        assert torch.equal(scr[lab], mask[lab])


def test_augmentation_is_a_function_of_seed_epoch_index():
    ds = SyntheticScribbles(4, seed=0)
    aug = AugmentedDataset(ds, RandomScaleCropFlip(48, (0.5, 1.5), True), seed=7)
    a = aug[2]["image"]
    assert torch.equal(a, AugmentedDataset(ds, RandomScaleCropFlip(48, (0.5, 1.5), True), seed=7)[2]["image"])
    aug.set_epoch(1)
    assert not torch.equal(a, aug[2]["image"])
    with pytest.raises(ValueError, match="scale_range"):
        RandomScaleCropFlip(8, (2.0, 1.0))
