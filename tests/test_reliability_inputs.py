"""Issue 17: hostile inputs to the readers and the image decoder (cases 4, 8, 9 and the input
weaker spots): each is reported with its file and field and the rest goes on."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf

from caaxr_tf.data import tfrecords as tfr
from caaxr_tf.data.bimcv import scan_bimcv
from caaxr_tf.data.dicom import read_dicom
from caaxr_tf.data.formats import MAX_IMAGE_PIXELS, image_size
from caaxr_tf.data.images import load_image
from caaxr_tf.data.records import InputError, ReadResult, SchemaError
from caaxr_tf.data.sources.caaxr import read_caaxr
from caaxr_tf.data.sources.chexpert import OBSERVATIONS, read_chexpert
from caaxr_tf.data.sources.covid_chestxray import read_lung_boxes

METADATA_HEADER = ["patientid", "finding", "view", "modality", "filename"]


def build(data_root: Path, out: Path, **kwargs) -> dict:
    return tfr.build_tfrecords(data_root, out, workers=1, progress=False, log=lambda line: None, **kwargs)


def png_bytes(pixels: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", pixels)
    assert ok
    return data.tobytes()


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` 8-bit grey pixels, with a tiny IDAT:
    what a decompression bomb looks like from its header (never decoded here)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(",".join(map(str, r)) for r in [header, *rows]) + "\n")


def covid_tree(root: Path, extra_rows: list[list] = ()) -> dict[str, bytes]:
    """A small covid-chestxray collection: 4 COVID and 4 other images of 8 patients."""
    images = root / "images"
    images.mkdir(parents=True)
    rows, written = [], {}
    for index in range(8):
        name = f"img{index}.png"
        pixels = np.full((40, 48), 30 * index, np.uint8)
        pixels[5:15, 5 + index : 20 + index] = 250
        written[name] = png_bytes(pixels)
        (images / name).write_bytes(written[name])
        rows.append([f"p{index}", "Pneumonia/Viral/COVID-19" if index < 4 else "No Finding", "PA", "X-ray", name])
    write_csv(root / "metadata.csv", METADATA_HEADER, rows + list(extra_rows))
    return written


def all_record_bytes(out: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(out.rglob("*.tfrecord")))


# --------------------------------------------------------------------------- case 4


def test_paths_outside_the_data_root_are_skipped_and_never_read(tmp_path):
    secret = tmp_path / "secret" / "evil.png"
    secret.parent.mkdir()
    evil = png_bytes(np.full((40, 48), 77, np.uint8))
    secret.write_bytes(evil)
    root = tmp_path / "collections" / "covid"
    covid_tree(root, [["p8", "COVID-19", "PA", "X-ray", "../../../secret/evil.png"],
                      ["p9", "COVID-19", "PA", "X-ray", str(secret)],
                      ["p10", "COVID-19", "PA", "X-ray", "images/../img0.png"]])  # inside: a duplicate
    assert (root / "images" / "../../../secret/evil.png").resolve() == secret.resolve()  # the attack would work

    summaries = build(root, tmp_path / "out", source="covid-chestxray", protocols="2class")
    skipped = {(Path(s["path"]).name, s["field"]): s["reason"] for s in summaries["2class"]["skipped"]}
    assert "points outside" in skipped[("metadata.csv", "row 10: filename")]
    assert "absolute path" in skipped[("metadata.csv", "row 11: filename")]
    assert "duplicate file name" in skipped[("metadata.csv", "row 12: filename")]
    assert summaries["2class"]["counts"]["total"] == {"covid": 4, "non_covid": 4}
    assert evil not in all_record_bytes(tmp_path / "out")
    assert (tmp_path / "out" / "2class" / "manifest.csv").read_text().count("evil") == 0


def test_chexpert_path_and_coco_file_name_outside_their_root(tmp_path):
    chexpert = tmp_path / "data" / "chexpert"
    outside = tmp_path / "data" / "secret" / "patient00009" / "study1" / "view1_frontal.jpg"
    inside = chexpert / "CheXpert-v1.0-small" / "train" / "patient00001" / "study1" / "view1_frontal.jpg"
    for path in (outside, inside):
        path.parent.mkdir(parents=True)
        path.write_bytes(cv2.imencode(".jpg", np.zeros((8, 8), np.uint8))[1].tobytes())
    labels = ["1.0"] + [""] * (len(OBSERVATIONS) - 1)
    header = ["Path", "Frontal/Lateral", "AP/PA", *OBSERVATIONS]
    write_csv(chexpert / "CheXpert-v1.0-small" / "train.csv", header, [
        ["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Frontal", "PA", *labels],
        ["CheXpert-v1.0-small/../../secret/patient00009/study1/view1_frontal.jpg", "Frontal", "PA", *labels],
        [str(outside), "Frontal", "PA", *labels],
    ])
    result = read_chexpert(chexpert, {"csv_files": ["CheXpert-v1.0-small/train.csv"]})
    assert [s.path for s in result.samples] == [str(inside)]
    reasons = {s.field: s.reason for s in result.skipped}
    assert "points outside" in reasons["row 3: Path"] and "absolute path" in reasons["row 4: Path"]

    images = tmp_path / "cxr" / "images"
    images.mkdir(parents=True)
    coco = {"images": [{"id": 1, "file_name": "../../data/secret/patient00009/study1/view1_frontal.jpg",
                        "height": 8, "width": 8}],
            "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]}],
            "categories": [{"id": 1, "name": "Right Lung"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    result = ReadResult()
    assert read_lung_boxes(tmp_path / "coco.json", images, result) == {}
    assert [(s.field, "points outside" in s.reason) for s in result.skipped] == [("image 1: file_name", True)]


# --------------------------------------------------------------------------- case 8


def test_huge_images_are_skipped_from_their_header_everywhere(tmp_path):
    root = tmp_path / "covid"
    covid_tree(root, [["p8", "COVID-19", "PA", "X-ray", "huge.png"]])
    (root / "images" / "huge.png").write_bytes(png_header_only(20000, 20000))
    coco = {"images": [{"id": i, "file_name": f"img{i}.png", "height": 40, "width": 48} for i in range(8)]
            + [{"id": 8, "file_name": "huge.png", "height": 20000, "width": 20000}],
            "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 20, 20]} for i in range(9)],
            "categories": [{"id": 1, "name": "Right Lung"}]}
    (root / "annotations").mkdir()
    (root / "annotations" / "lung_bounding_boxes.json").write_text(json.dumps(coco))
    assert image_size(root / "images" / "huge.png") == (20000, 20000)

    summaries = build(root, tmp_path / "out", source="covid-chestxray", protocols="seg")
    skipped = [s for s in summaries["seg"]["skipped"] if s["path"].endswith("huge.png")]
    assert [(s["field"], "exceed the limit of 100 MP" in s["reason"]) for s in skipped] == [("image", True)]
    assert summaries["seg"]["counts"]["total"] == {"lungs": 8}

    with pytest.raises(InputError, match=r"20000x20000 pixels \(400.0 MP\) exceed"):
        load_image(root / "images" / "huge.png")
    assert MAX_IMAGE_PIXELS == 100_000_000


def test_jpeg_size_is_read_past_its_exif_segment(tmp_path):
    from PIL import Image

    path = tmp_path / "a.jpg"
    exif = Image.Exif()
    exif[0x010E] = "x" * 3000  # a long ImageDescription before the frame header
    Image.fromarray(np.zeros((37, 53), np.uint8)).save(path, exif=exif.tobytes())
    assert image_size(path) == (37, 53)
    assert image_size(path.read_bytes()[:200]) is None  # cut before the frame header


def test_huge_and_32_bit_lut_dicoms_fail_fast_with_the_field(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def dicom(path: Path, rows: int, columns: int, bits: int, lut: Dataset | None) -> Path:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "P"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 32 if bits > 16 else 16, bits, bits - 1, 0
        ds.Rows, ds.Columns = rows, columns
        stored = np.arange(16, dtype=np.uint32 if bits == 32 else np.uint16).reshape(4, 4) * (4095 // 15)
        ds.PixelData = stored.astype("<u4" if bits == 32 else "<u2").tobytes()
        if lut is not None:
            ds.ModalityLUTSequence = Sequence([lut])
        ds.save_as(path, enforce_file_format=True)
        return path

    def lut(entries: int, data: list[int]) -> Dataset:
        item = Dataset()
        item.LUTDescriptor = [entries, 0, 16]
        item.ModalityLUTType = "US"
        item.LUTData = np.asarray(data, "<u2").tobytes()  # OW
        return item

    started = time.perf_counter()
    with pytest.raises(InputError) as big:
        read_dicom(dicom(tmp_path / "big.dcm", 20000, 20000, 16, None))
    assert big.value.field == "Rows/Columns" and "400.0 MP" in big.value.reason
    with pytest.raises(InputError) as wide:
        read_dicom(dicom(tmp_path / "lut32.dcm", 4, 4, 32, lut(4, [0, 10, 20, 30])))
    assert wide.value.field == "ModalityLUTSequence" and "BitsStored 32 is not supported" in wide.value.reason
    assert time.perf_counter() - started < 5  # no 32 GiB table, no 400 MP decode

    # a 12-bit Modality LUT Sequence still applies: an inverting table gives inverted output
    inverting = read_dicom(dicom(tmp_path / "lut12.dcm", 4, 4, 12, lut(4096, list(range(4095, -1, -1)))))
    plain = read_dicom(dicom(tmp_path / "plain.dcm", 4, 4, 12, None))
    np.testing.assert_array_equal(inverting.pixels.astype(int), 65535 - plain.pixels.astype(int))


# --------------------------------------------------------------------------- case 9


def copy_caaxr(tiny_data_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_data_root, root, ignore=shutil.ignore_patterns("chexpert"))
    return root


def boxed_entries(root: Path) -> list[dict]:
    return [e for e in json.loads((root / "synthetic.json").read_text())["images"] if e["category"] == "covid_boxes"]


def test_deeply_nested_json_is_one_skipped_input(tiny_data_root, tmp_path):
    root = copy_caaxr(tiny_data_root, tmp_path)
    sidecar = (root / boxed_entries(root)[0]["path"]).with_suffix(".json")
    sidecar.write_text("[" * 200_000 + "]" * 200_000)
    summaries = build(root, tmp_path / "out", protocols="seg", storage_size=32)
    reports = [s for s in summaries["seg"]["skipped"] if s["path"] == str(sidecar)]
    assert [(r["field"], r["reason"]) for r in reports] == [("json", "nested too deeply to be read as JSON")]
    assert summaries["seg"]["counts"]["total"] == {"lesion": 29}

    deep_coco = tmp_path / "coco.json"
    deep_coco.write_text('{"images": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(SchemaError, match="nested too deeply"):
        read_lung_boxes(deep_coco, tmp_path, ReadResult())


# --------------------------------------------------------------------------- weaker spots


def test_jpeg_with_bytes_after_its_end_marker_is_accepted_and_a_truncated_one_is_not(tmp_path):
    pixels = np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))
    data = cv2.imencode(".jpg", pixels)[1].tobytes()
    trailing = tmp_path / "trailing.jpg"
    trailing.write_bytes(data + b"\x00 camera trailer \xff\xd8 not an image")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    reference = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(load_image(trailing).pixels, reference)
    decoded = tf.io.decode_jpeg(trailing.read_bytes(), channels=1, dct_method="INTEGER_ACCURATE").numpy()[..., 0]
    np.testing.assert_array_equal(decoded, reference)  # what serving sees from the same bytes
    with pytest.raises(InputError, match="truncated JPEG"):
        load_image(truncated)
    with pytest.raises(InputError, match="empty"):
        (tmp_path / "empty.png").write_bytes(b"")
        load_image(tmp_path / "empty.png")


@contextlib.contextmanager
def released_if_opened(fifo: Path):
    """Should the code under test open ``fifo`` for reading, give it end-of-file at once so
    that a regression fails the test instead of hanging it."""
    done = threading.Event()

    def release() -> None:
        while not done.is_set():
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # ENXIO: nobody is reading
                done.wait(0.05)

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def test_fifo_and_broken_link_are_named_not_opened(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with released_if_opened(fifo), pytest.raises(InputError, match=r"not a regular file \(a FIFO"):
        load_image(fifo)  # opening it would block until something writes to it
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "gone.png")
    with pytest.raises(InputError, match="broken symbolic link"):
        load_image(link)


def test_bimcv_broken_link_and_size_disagreeing_with_its_sidecar(tiny_data_root, tmp_path):
    root = copy_caaxr(tiny_data_root, tmp_path)
    entries = boxed_entries(root)
    linked = root / entries[0]["path"]
    linked.unlink()
    linked.symlink_to(root / "nowhere.png")
    resized = root / entries[1]["path"]
    pixels = cv2.imread(str(resized), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(resized), cv2.resize(pixels, (pixels.shape[1] // 2, pixels.shape[0] // 2)))

    scan = scan_bimcv(root / "bimcv")
    reasons = {(s.path, s.field): s.reason for s in scan.result.skipped}
    assert "broken symbolic link" in reasons[(str(linked), "file")]
    size_reason = reasons[(str(resized.with_suffix(".json")), "00280010/00280011 (Rows/Columns)")]
    width, height = entries[1]["width"], entries[1]["height"]
    assert f"gives {width}x{height}" in size_reason and f"is {width // 2}x{height // 2}" in size_reason

    caaxr = read_caaxr(root)
    for path in (linked, resized):  # reported once, by the BIMCV reader, not again as "not found"
        stem = path.stem
        assert sum(stem in s.path or stem in s.reason for s in caaxr.skipped) == 1, [str(s) for s in caaxr.skipped]
    assert {s.image_id for s in caaxr.samples}.isdisjoint({linked.stem, resized.stem})


def test_fifo_sidecar_is_one_skipped_input_not_a_hang(tiny_data_root, tmp_path):
    root = copy_caaxr(tiny_data_root, tmp_path)
    sidecar = (root / boxed_entries(root)[0]["path"]).with_suffix(".json")
    sidecar.unlink()
    os.mkfifo(sidecar)
    with released_if_opened(sidecar):
        summaries = build(root, tmp_path / "out", protocols="seg", storage_size=32)
    reports = [s for s in summaries["seg"]["skipped"] if s["path"] == str(sidecar)]
    assert [(r["field"], r["reason"]) for r in reports] == [("file", "sidecar is not a regular file")]
    assert summaries["seg"]["counts"]["total"] == {"lesion": 29}
