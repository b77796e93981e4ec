"""QaTa-COV19 reader, binary mask checks, the synthetic QaTa tree and the real lungVAE lung masks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from caaxr_tf.data import synthetic_qata
from caaxr_tf.data.images import encode_png
from caaxr_tf.data.masks import read_binary_mask
from caaxr_tf.data.records import InputError, SchemaError
from caaxr_tf.data.sources.covid_chestxray import read_covid_chestxray
from caaxr_tf.data.sources.covid_chestxray_lungs import attach_lung_masks
from caaxr_tf.data.sources.qata import QataConfig, read_qata
from caaxr_tf.data.synthetic import _frontal_anatomy, _lung_mask

REPO = Path(__file__).resolve().parents[1]


def _write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(pixels))
    return path


def _image(height: int = 20, width: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)


def _mask(height: int = 20, width: int = 16, high: int = 255) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[4:12, 3:9] = high
    return mask


# --------------------------------------------------------------------------- binary masks


def test_read_binary_mask_levels_and_tolerance(tmp_path):
    expected = _mask() > 0
    for name, pixels in [
        ("255.png", _mask()),
        ("01.png", _mask(high=1)),
        ("rgb.png", np.repeat(_mask()[..., None], 3, axis=2)),
        ("16bit.png", _mask().astype(np.uint16) * 257),
    ]:
        np.testing.assert_array_equal(read_binary_mask(_write_png(tmp_path / name, pixels)), expected, err_msg=name)
    # 3 of 320 pixels in between (0.94 %): tolerated, binarised at 128
    edges = _mask()
    edges[4, 3], edges[0, 0], edges[19, 15] = 127, 128, 200
    tolerated = read_binary_mask(_write_png(tmp_path / "edges.png", edges))
    assert not tolerated[4, 3] and tolerated[0, 0] and tolerated[19, 15]
    assert np.count_nonzero(tolerated) == np.count_nonzero(expected) - 1 + 2
    # 4 of 320 (1.25 %): not binary
    edges[1, 1] = 90
    _write_png(tmp_path / "soft.png", edges)
    with pytest.raises(InputError, match=r"not binary: 4 of 320 pixels \(1.25 %\) are neither 0 nor 255") as info:
        read_binary_mask(tmp_path / "soft.png")
    assert info.value.field == "mask" and info.value.path == str(tmp_path / "soft.png")
    assert read_binary_mask(tmp_path / "soft.png", max_gray_fraction=0.02).shape == (20, 16)
    with pytest.raises(InputError, match="file not found") as info:
        read_binary_mask(tmp_path / "missing.png")
    assert info.value.field == "mask"
    (tmp_path / "cut.png").write_bytes(encode_png(_mask())[:40])
    with pytest.raises(InputError, match="truncated PNG") as info:
        read_binary_mask(tmp_path / "cut.png")
    assert info.value.field == "mask"


# --------------------------------------------------------------------------- hand-made QaTa trees


def _default_tree(root: Path) -> None:
    """A v2-style tree with one bad input of every kind."""
    train, test = root / "Train Set", root / "Test Set"
    _write_png(train / "Images" / "good.png", _image())
    _write_png(train / "Ground-truths" / "mask_good.png", _mask())
    _write_png(train / "Images" / "zero_one.png", _image(seed=1))
    _write_png(train / "Ground-truths" / "mask_zero_one.png", _mask(high=1))
    _write_png(train / "Images" / "resized.png", _image())
    _write_png(train / "Ground-truths" / "mask_resized.png", _mask(20, 18))  # another size
    _write_png(train / "Images" / "soft.png", _image())
    _write_png(train / "Ground-truths" / "mask_soft.png", cv2.GaussianBlur(_mask(), (5, 5), 2))  # not binary
    _write_png(train / "Images" / "unmasked.png", _image())  # COVID-19 image without a mask
    _write_png(train / "Ground-truths" / "mask_lonely.png", _mask())  # mask without an image
    _write_png(train / "Ground-truths" / "lonely_gt.png", _mask())  # no prefix
    (train / "Images" / "broken.png").write_bytes(b"not an image at all")
    _write_png(train / "Ground-truths" / "mask_broken.png", _mask())  # its image is reported, not it
    (train / "Images" / "notes.txt").write_text("hello")
    (train / "Images" / ".DS_Store").write_bytes(b"\0")  # hidden: ignored
    ok, jpeg = cv2.imencode(".jpg", _image(seed=2))
    (test / "Images").mkdir(parents=True)
    (test / "Images" / "scan.jpg").write_bytes(jpeg.tobytes())
    _write_png(test / "Ground-truths" / "mask_scan.png", _mask())  # JPEG image, PNG mask
    _write_png(test / "Images" / "good.png", _image(seed=3))  # same name as in the train set
    _write_png(test / "Ground-truths" / "mask_good.png", _mask())
    controls = root / "Control_Group"
    _write_png(controls / "Control_Group_I" / "normal_1.png", _image(24, 24, seed=4))
    _write_png(controls / "Control_Group_II" / "deeper" / "normal_2.png", _image(seed=5))
    (controls / "Control_Group_II" / "empty.png").write_bytes(b"")


def test_reader_on_a_hand_made_tree(tmp_path):
    _default_tree(tmp_path)
    result = read_qata(tmp_path)
    by_id = {s.image_id: s for s in result.samples}
    assert sorted(by_id) == ["good.png", "normal_1.png", "normal_2.png", "scan.jpg", "zero_one.png"]
    good = by_id["good.png"]
    assert good.path == str(tmp_path / "Train Set" / "Images" / "good.png")  # the first of the two
    assert good.mask_path == str(tmp_path / "Train Set" / "Ground-truths" / "mask_good.png")
    assert good.labels == {"COVID-19": 1.0} and good.findings == ("COVID-19",)
    assert good.source == "qata" and good.patient_id == "good.png" and good.bit_depth == 8
    assert by_id["scan.jpg"].mask_path.endswith("Test Set/Ground-truths/mask_scan.png")
    for control in ("normal_1.png", "normal_2.png"):
        assert by_id[control].labels == {"COVID-19": 0.0} and by_id[control].findings == ("control",)
        assert by_id[control].mask_path == ""

    train, test = tmp_path / "Train Set", tmp_path / "Test Set"
    reported = {(s.path, s.field): s.reason for s in result.skipped}
    expected = {
        (str(train / "Ground-truths" / "mask_resized.png"), "mask"): "mask is 18x20 but its image resized.png is 16x20",
        (str(train / "Ground-truths" / "mask_soft.png"), "mask"): "not binary",
        (str(train / "Images" / "unmasked.png"), "mask"): "COVID-19 image without a mask (mask_unmasked.png not in",
        (str(train / "Ground-truths" / "mask_lonely.png"), "mask"): "mask without an image (lonely.png not in",
        (str(train / "Ground-truths" / "lonely_gt.png"), "mask"): "does not start with 'mask_'",
        (str(train / "Images" / "broken.png"), "image"): "not a PNG, JPEG or TIFF file",
        (str(train / "Images" / "notes.txt"), "file"): "not an image file by its name",
        (str(test / "Images" / "good.png"), "image_id"): "duplicate image id 'good.png'",
        (str(tmp_path / "Control_Group" / "Control_Group_II" / "empty.png"), "image"): "file is empty",
    }
    assert set(reported) == set(expected)
    for key, start in expected.items():
        assert start in reported[key], (key, reported[key])


def test_reader_with_a_configured_layout(tmp_path):
    # a v1-style tree: the sets are the root itself, other folder names and prefix
    _write_png(tmp_path / "imgs" / "a.png", _image())
    _write_png(tmp_path / "gts" / "gt_a.png", _mask())
    _write_png(tmp_path / "imgs" / "b.png", _image())
    _write_png(tmp_path / "gts" / "mask_b.png", _mask())  # the default prefix is not this layout's
    layout = dict(covid_sets=["."], images_dir="imgs", masks_dir="gts", mask_prefix="gt_", control_dirs=["normals"])
    result = read_qata(tmp_path, layout)
    assert [s.image_id for s in result.samples] == ["a.png"]
    assert result.samples[0].mask_path == str(tmp_path / "gts" / "gt_a.png")
    fields = sorted((Path(s.path).name, s.field) for s in result.skipped)
    assert fields == [("b.png", "mask"), ("mask_b.png", "mask"), ("normals", "folder")]
    assert read_qata(tmp_path, QataConfig(**{**layout, "covid_sets": (".",), "control_dirs": ("normals",)})) == result
    with pytest.raises(ValueError, match=r"unknown key 'image_dir' in qata \(did you mean 'images_dir'\?\); valid keys: "):
        read_qata(tmp_path, {"image_dir": "imgs"})
    with pytest.raises(ValueError, match="qata.covid_sets must be a list"):
        read_qata(tmp_path, {"covid_sets": "."})
    with pytest.raises(SchemaError, match="none of the configured QaTa-COV19 folders exists"):
        read_qata(tmp_path)  # the default layout finds nothing here


# --------------------------------------------------------------------------- synthetic QaTa tree


@pytest.fixture(scope="module")
def tiny_qata(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("qata_tiny")
    return root, synthetic_qata.generate(root, scale="tiny", seed=0)


def test_synthetic_tree_is_what_the_reader_expects(tiny_qata):
    root, manifest = tiny_qata
    tiny = synthetic_qata.SCALES["tiny"]
    counts = manifest["counts"]
    assert counts["covid"] == tiny["covid"] and counts["control"] == tiny["control"]
    assert all(counts[kind] == tiny["bad"] for kind in ("gray_edges",) + synthetic_qata.BAD_KINDS)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == sorted(manifest["files"] + [synthetic_qata.MANIFEST_NAME])
    assert any(f.startswith("Test Set/Images/") for f in files) and any("Control_Group_II/" in f for f in files)

    result = read_qata(root)
    wanted = [e for e in manifest["images"] if e["expect"] == "sample"]
    assert sorted(s.image_id for s in result.samples) == sorted(e["name"] for e in wanted)
    by_id = {s.image_id: s for s in result.samples}
    for entry in wanted:
        sample = by_id[entry["name"]]
        assert sample.path == str(root / entry["image_path"])
        assert sample.labels == {"COVID-19": 1.0 if entry["label"] == "COVID-19" else 0.0}
        if entry["label"] == "COVID-19":
            mask = read_binary_mask(sample.mask_path)
            assert mask.shape == (entry["height"], entry["width"])
            assert np.count_nonzero(mask) == entry["lesion_pixels"] > 0
        else:
            assert sample.mask_path == ""
    skipped = sorted((s.path, s.field) for s in result.skipped)
    bad = [e for e in manifest["images"] if e["expect"] == "skipped"]
    expected = sorted((str(root / e["skip_path"]), e["skip_field"]) for e in bad)
    assert skipped == expected
    assert all(e["gray_pixels"] > 0 for e in manifest["images"] if e["kind"] == "gray_edges")


def test_synthetic_lesions_are_irregular_visible_and_inside_the_lungs(tiny_qata):
    root, manifest = tiny_qata
    # the lesions of every COVID-19 image of the tiny tree, against the same image drawn as a control
    for entry in manifest["images"]:
        if entry["kind"] != "covid":
            continue
        fields = {k: entry[k] for k in ("index", "name", "image_path", "mask_path")}
        covid, lesion = synthetic_qata.render(synthetic_qata.QataSpec(kind="covid", **fields), "tiny", seed=0)
        control, none = synthetic_qata.render(synthetic_qata.QataSpec(kind="control", **fields), "tiny", seed=0)
        assert none is None
        stored = cv2.imread(str(root / entry["image_path"]), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(stored, np.round(covid * 255).astype(np.uint8))
        contrast = float(covid[lesion].mean() - control[lesion].mean())
        assert contrast > 0.1, (entry["name"], contrast)  # 0.18-0.28 less the blur at the edges

    # shapes and placement, over many draws of the lesion model
    rng = np.random.default_rng(0)
    fill, hull_fill, lateral, lower = [], [], [], []
    for _ in range(40):
        anatomy = _frontal_anatomy(rng, 300, 260, 1.0)
        lungs = _lung_mask(anatomy)
        lesion = synthetic_qata._lesions(rng, anatomy, lungs)
        assert lesion.any() and not (lesion & ~lungs).any()
        assert np.count_nonzero(lesion) >= synthetic_qata.MIN_LESION_SHARE * lesion.size
        count, labels, stats, centroids = cv2.connectedComponentsWithStats(lesion.astype(np.uint8))
        for k in range(1, count):
            area = stats[k, cv2.CC_STAT_AREA]
            if area < 30:
                continue
            fill.append(area / (stats[k, cv2.CC_STAT_WIDTH] * stats[k, cv2.CC_STAT_HEIGHT]))
            contours, _ = cv2.findContours((labels == k).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            hull_fill.append(area / max(1.0, cv2.contourArea(cv2.convexHull(contours[0]))))
            x, y = centroids[k]
            side = 0 if x < anatomy.body[0] else 1
            cx, cy, ax, ay = anatomy.lungs[side]
            lateral.append((cx - x) / ax if side == 0 else (x - cx) / ax)
            lower.append((y - cy) / ay)
    assert max(fill) < 0.95 and np.median(fill) < 0.8  # no rectangles
    assert np.median(hull_fill) < 0.95  # ragged, concave outlines
    assert np.mean(lateral) > 0.15 and np.mean(lower) > 0.1  # peripheral and lower-zone preference


def test_synthetic_tree_is_deterministic_across_processes(tiny_qata, tmp_path):
    root, manifest = tiny_qata
    other = tmp_path / "again"
    result = subprocess.run(
        [sys.executable, "tools/make_synthetic_qata.py", "--out", str(other), "--workers", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"covid\s+14\n", result.stdout)
    for relative in manifest["files"] + [synthetic_qata.MANIFEST_NAME]:
        assert (other / relative).read_bytes() == (root / relative).read_bytes(), relative
    reseeded = synthetic_qata.generate(tmp_path / "seed1", scale="tiny", seed=1)
    first = manifest["images"][0]["image_path"]
    assert (tmp_path / "seed1" / first).read_bytes() != (root / first).read_bytes()
    assert reseeded["counts"] == manifest["counts"]


# --------------------------------------------------------------------------- real lungVAE lung masks


@pytest.mark.realdata
def test_lungvae_masks_attach_with_exact_counts(covid_chestxray_root):
    root = covid_chestxray_root
    masks_dir, images_dir = root / "annotations" / "lungVAE-masks", root / "images"
    read = read_covid_chestxray(root)
    result = attach_lung_masks(read, masks_dir, images_dir)

    # independently: the file listings and the pixels
    canonical = {p.name[: -len("_mask.png")]: p for p in masks_dir.iterdir() if p.name.endswith("_mask.png")}
    doubled = [p for p in masks_dir.iterdir() if p.name.endswith("_mask.png.png")]
    image_stems = {p.stem: p for p in images_dir.iterdir()}
    sample_stems = {Path(s.path).stem for s in read.samples}
    with_mask = sample_stems & set(canonical)
    sizes_differ, gray_masks = 0, 0
    for stem in with_mask:
        mask = cv2.imread(str(canonical[stem]), cv2.IMREAD_UNCHANGED)
        image = cv2.imread(str(image_stems[stem]), cv2.IMREAD_UNCHANGED)
        sizes_differ += mask.shape[:2] != image.shape[:2]
        gray = np.count_nonzero((mask != 0) & (mask != 255))
        assert gray <= 0.002 * mask.size  # a few anti-aliased pixels at most
        gray_masks += gray > 0
    assert sizes_differ == 0  # resized with nearest neighbour together with the images
    assert gray_masks == 7

    assert len(result.samples) == len(with_mask) == 192
    assert all(s.mask_path == str(canonical[Path(s.path).stem]) for s in result.samples)
    assert result.excluded["no lung mask"] == len(sample_stems - set(canonical)) == len(read.samples) - 192
    not_read = [s for s in canonical if s in image_stems and s not in sample_stems]
    assert result.excluded["lung mask of an image not read"] == len(not_read) == 6
    new = result.skipped[len(read.skipped):]
    no_image = sorted(str(canonical[s]) for s in canonical if s not in image_stems)
    assert sorted(s.path for s in new if "without an image" in s.reason) == no_image and len(no_image) == 7
    assert sorted(s.path for s in new if "second mask" in s.reason) == sorted(str(p) for p in doubled)
    assert len(doubled) == 4 and len(new) == 11 and all(s.field == "mask" for s in new)
    assert result.excluded["non-frontal view"] == read.excluded["non-frontal view"]


def test_lung_masks_bad_inputs(tmp_path):
    from caaxr_tf.data.records import ReadResult, Sample

    images, masks = tmp_path / "images", tmp_path / "masks"
    samples = []
    for name in ("a", "b", "c", "d"):
        samples.append(Sample(name, name, "covid-chestxray", str(_write_png(images / f"{name}.png", _image()))))
    _write_png(masks / "a_mask.png", _mask())
    _write_png(masks / "b_mask.png", _mask(20, 12))  # another size
    _write_png(masks / "c_mask.png", cv2.GaussianBlur(_mask(), (5, 5), 2))  # not binary
    _write_png(masks / "e_mask.png", _mask())  # no image
    (masks / "readme.md").write_text("x")
    result = attach_lung_masks(ReadResult(samples=samples), masks, images)
    assert [s.image_id for s in result.samples] == ["a"]
    assert result.samples[0].mask_path == str(masks / "a_mask.png")
    assert result.excluded == {"no lung mask": 1}  # d
    reasons = {Path(s.path).name: s.reason for s in result.skipped}
    assert set(reasons) == {"b_mask.png", "c_mask.png", "e_mask.png", "readme.md"}
    assert reasons["b_mask.png"] == "mask is 12x20 but its image b.png is 16x20"
    assert reasons["c_mask.png"].startswith("not binary")
    assert "without an image" in reasons["e_mask.png"]
    missing = attach_lung_masks(ReadResult(samples=samples), tmp_path / "nowhere")
    assert missing.samples == [] and missing.excluded == {"no lung mask": 4} and missing.skipped[0].field == "folder"
