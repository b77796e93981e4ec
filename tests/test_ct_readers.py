"""CT readers: 16-bit TIFF slices, the COVID-CTset layouts and CSV, DICOM series; their bad inputs."""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from caaxr_tf.data.ct_series import (
    check_ct_tiff,
    find_ct_series,
    hu_to_raw,
    read_ct_dicom,
    read_ct_tiff,
    read_dicom_ct_dir,
)
from caaxr_tf.data.formats import read_tiff_info
from caaxr_tf.data.records import InputError, SchemaError
from caaxr_tf.data.sources.covid_ctset import PATIENT_LABEL, SLICE_LABEL, SOURCE, read_covid_ctset
from caaxr_tf.data.synthetic_ct import generate, write_dicom_series


@pytest.fixture(scope="module")
def ct_tiny(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("ct_tiny")
    return root, generate(root, "tiny", seed=0)


def raw_slice(seed: int, high: int = 5000) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, size=(512, 512), dtype=np.uint16)


# --- TIFF ----------------------------------------------------------------------------------


def test_16_bit_tiff_is_read_without_losing_bits(tmp_path):
    pixels = raw_slice(0, 65536)
    pixels[0, :3] = (0, 4095, 65535)
    for compression in (cv2.IMWRITE_TIFF_COMPRESSION_NONE, cv2.IMWRITE_TIFF_COMPRESSION_LZW):
        path = tmp_path / f"slice{compression}.tif"
        assert cv2.imwrite(str(path), pixels, [cv2.IMWRITE_TIFF_COMPRESSION, compression])
        loaded = read_ct_tiff(path)
        assert loaded.dtype == np.uint16
        np.testing.assert_array_equal(loaded, pixels)
        info = check_ct_tiff(path)
        assert (info.width, info.height, info.bits, info.samples) == (512, 512, 16, 1)


def handmade_tiff(order: str, width: int, height: int, pixels: np.ndarray) -> bytes:
    """An uncompressed one-strip grey TIFF written byte by byte (independent of OpenCV)."""
    magic = b"II*\x00" if order == "<" else b"MM\x00*"
    data = pixels.astype(order + "u2").tobytes()
    entries = [(256, 3, 1, width), (257, 3, 1, height), (258, 3, 1, 16), (259, 3, 1, 1),
               (262, 3, 1, 1), (273, 4, 1, 0), (277, 3, 1, 1), (278, 3, 1, height), (279, 4, 1, len(data))]
    ifd_size = 2 + 12 * len(entries) + 4
    data_offset = 8 + ifd_size
    ifd = struct.pack(order + "H", len(entries))
    for tag, kind, count, value in entries:
        value = data_offset if tag == 273 else value
        packed = struct.pack(order + ("H" if kind == 3 else "I"), value).ljust(4, b"\x00")
        ifd += struct.pack(order + "HHI", tag, kind, count) + packed
    return magic + struct.pack(order + "I", 8) + ifd + struct.pack(order + "I", 0) + data


@pytest.mark.parametrize("order", ["<", ">"])
def test_header_parser_on_handmade_tiffs(tmp_path, order):
    pixels = raw_slice(1).astype(np.uint16)
    path = tmp_path / "slice.tif"
    path.write_bytes(handmade_tiff(order, 512, 512, pixels))
    info = read_tiff_info(path)
    assert (info.width, info.height, info.bits, info.samples, info.compression) == (512, 512, 16, 1, 1)
    np.testing.assert_array_equal(read_ct_tiff(path), pixels)  # OpenCV agrees with the header
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(InputError, match="StripByteCounts: truncated"):
        read_tiff_info(path)


def test_bad_tiff_slices_name_the_file_and_field(tmp_path):
    cases = {
        "eight_bit.tif": (lambda p: cv2.imwrite(str(p), np.zeros((512, 512), np.uint8)), "BitsPerSample"),
        "small.tif": (lambda p: cv2.imwrite(str(p), np.zeros((256, 512), np.uint16)), "ImageWidth/ImageLength"),
        "colour.tif": (lambda p: cv2.imwrite(str(p), np.zeros((512, 512, 3), np.uint16)), "SamplesPerPixel"),
        "float.tif": (lambda p: cv2.imwrite(str(p), np.zeros((512, 512), np.float32)), "BitsPerSample"),
        "png.tif": (lambda p: p.write_bytes(cv2.imencode(".png", np.zeros((512, 512), np.uint16))[1].tobytes()), "file"),
        "empty.tif": (lambda p: p.write_bytes(b""), "file"),
    }
    for name, (write, field) in cases.items():
        path = tmp_path / name
        write(path)
        for check in (check_ct_tiff, read_ct_tiff):
            with pytest.raises(InputError) as error:
                check(path)
            assert (error.value.path, error.value.field) == (str(path), field), (name, check.__name__)


# --- the COVID-CTset reader on the synthetic set -------------------------------------------


def test_reader_finds_what_the_manifest_says(ct_tiny):
    root, manifest = ct_tiny
    result = read_covid_ctset(root)
    expected_skipped = {(str(root / bad["path"]), bad["field"])
                        for entry in manifest["series"] for bad in entry["bad_files"]}
    assert {(s.path, s.field) for s in result.skipped} == expected_skipped
    assert len(expected_skipped) == 4 and result.excluded == {}

    good = [entry for entry in manifest["series"] if entry["bad"] != "one_slice"]
    expected = {}
    for entry in good:
        for item in entry["slices"]:
            labels = {PATIENT_LABEL: 1.0 if entry["covid"] else 0.0}
            if item["label"]:
                labels[SLICE_LABEL] = 1.0 if item["label"] == "covid" else 0.0
            stem = Path(item["file"]).stem
            expected[f"{entry['patient_id']}_{entry['series']}_{stem}"] = (
                str(root / item["file"]), entry["patient_id"], f"{entry['patient_id']}/{entry['series']}",
                item["index"], labels)
    found = {s.image_id: (s.path, s.patient_id, s.series_id, s.slice_index, s.labels) for s in result.samples}
    assert found == expected
    assert {s.source for s in result.samples} == {SOURCE} and {s.bit_depth for s in result.samples} == {16}
    labelled = Counter(s.labels.get(SLICE_LABEL) for s in result.samples)
    assert labelled[1.0] == manifest["counts"]["labelled_covid"] > 0
    assert labelled[0.0] == manifest["counts"]["labelled_normal"] > 0


def test_reader_series_filter_and_no_csv(ct_tiny):
    root, manifest = ct_tiny
    result = read_covid_ctset(root, {"series": ["SR_3"], "labels_csv": None})
    sr3 = [e for e in manifest["series"] if e["series"] == "SR_3"]
    assert len(result.samples) == sum(len(e["slices"]) for e in sr3) > 0
    assert all(SLICE_LABEL not in s.labels for s in result.samples)
    assert result.excluded["series not selected in the config"] > 0


# --- the training-part layout and the CSV ---------------------------------------------------


def write_flat(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        assert cv2.imwrite(str(folder / name), raw_slice(index))


def test_flat_layout_and_csv_rows(tmp_path):
    write_flat(tmp_path / "Train&Validation", [
        "137covid_patient1_SR_2_IM00010.tif", "137covid_patient1_SR_2_IM00011.tif",
        "normal1_patient214_SR_2_IM00009.tif", "normal4_patient214_SR_2_IM00009.tif",  # one slice, twice
        "normal2_patient5_SR_3_IM00002.tif",
    ])
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join([
        "filename,class",
        "137covid_patient1_SR_2_IM00010.tif,covid",     # row 2
        "137covid_patient1_SR_2_IM00011.tif,normal",    # row 3: a clear slice of a COVID patient
        "normal1_patient214_SR_2_IM00009.tif,normal",   # row 4
        "normal4_patient214_SR_2_IM00009.tif,normal",   # row 5: same slice again, same class
        "normal2_patient5_SR_3_IM00002.tif,covid",      # row 6: covid in a normal group
        "137covid_patient1_SR_2_IM00099.tif,covid",     # row 7: no such slice
        "patient1_IM00010.tif,covid",                   # row 8: not the naming
        "137covid_patient1_SR_2_IM00010.tif,maybe",     # row 9: unknown class
        "137covid_patient1_SR_2_IM00010.tif,normal",    # row 10: contradicts row 2
    ]) + "\n")
    result = read_covid_ctset(tmp_path, {"labels_csv": str(csv)})
    skipped = {(Path(s.path).name, s.field) for s in result.skipped}
    assert skipped == {
        ("labels.csv", "row 6: class"), ("labels.csv", "row 7: filename"), ("labels.csv", "row 8: filename"),
        ("labels.csv", "row 9: class"), ("labels.csv", "row 10: class"),
        ("normal4_patient214_SR_2_IM00009.tif", "image_id"),  # the second copy of the slice
    }
    assert result.excluded == {"CSV row repeating a labelled slice": 1}
    samples = {s.image_id: s for s in result.samples}
    assert set(samples) == {"patient1_SR_2_IM00010", "patient1_SR_2_IM00011", "patient214_SR_2_IM00009",
                            "patient5_SR_3_IM00002"}
    assert samples["patient1_SR_2_IM00010"].labels == {PATIENT_LABEL: 1.0, SLICE_LABEL: 1.0}
    assert samples["patient1_SR_2_IM00011"].labels == {PATIENT_LABEL: 1.0, SLICE_LABEL: 0.0}
    assert samples["patient214_SR_2_IM00009"].labels == {PATIENT_LABEL: 0.0, SLICE_LABEL: 0.0}
    assert samples["patient214_SR_2_IM00009"].path.endswith("normal1_patient214_SR_2_IM00009.tif")
    assert samples["patient5_SR_3_IM00002"].labels == {PATIENT_LABEL: 0.0}
    # One labelled slice per series is how the training part is made: not reported.
    assert samples["patient1_SR_2_IM00011"].slice_index == 1


def test_csv_without_its_columns_stops_the_run(tmp_path):
    write_flat(tmp_path, ["137covid_patient1_SR_2_IM00010.tif"])
    (tmp_path / "all.csv").write_text("file,label\nx,covid\n")
    with pytest.raises(SchemaError, match="filename, class"):
        read_covid_ctset(tmp_path)


def test_patient_in_covid_and_normal_groups_and_unknown_groups(tmp_path):
    for group in ("covid1", "normal3"):
        write_flat(tmp_path / group / "patient8" / "SR_2", ["IM00001.tif", "IM00002.tif"])
    write_flat(tmp_path / "others" / "patient9" / "SR_2", ["IM00001.tif", "IM00002.tif"])
    write_flat(tmp_path / "covid1" / "patient10" / "SR_2", ["IM00001.tif", "IM00002.tif"])
    (tmp_path / "covid1" / "loose.tif").write_bytes(b"II*\x00")
    result = read_covid_ctset(tmp_path, {"labels_csv": None})
    assert {s.patient_id for s in result.samples} == {"patient10"}
    fields = Counter((Path(s.path).relative_to(tmp_path).parts[0], s.field) for s in result.skipped)
    assert fields == {("others", "group"): 2, ("covid1", "group"): 1, ("covid1", "path"): 1}


# --- DICOM series --------------------------------------------------------------------------


def test_dicom_series_round_trip_and_order(tmp_path):
    volume = np.stack([raw_slice(seed, 4096) for seed in range(5)])
    paths = write_dicom_series(tmp_path / "s", volume, patient_id="P1", seed=1)
    scan = find_ct_series(tmp_path)
    assert scan.skipped == [] and len(scan.series) == 1
    series = scan.series[0]
    assert (series.kind, series.patient_id, series.paths) == ("dicom", "P1", tuple(str(p) for p in paths))
    for index in range(5):
        np.testing.assert_array_equal(series.read(index), volume[index])

    # Without InstanceNumber the order comes from ImagePositionPatient along the normal.
    for path in paths:
        ds = pydicom.dcmread(path)
        del ds.InstanceNumber
        ds.save_as(path)
    assert find_ct_series(tmp_path).series[0].paths == tuple(str(p) for p in paths)

    samples = read_dicom_ct_dir(tmp_path, labels={"patient_covid": 1.0}).samples
    assert [s.slice_index for s in samples] == list(range(5))
    assert [s.path for s in samples] == [str(p) for p in paths]
    assert {s.series_id for s in samples} == {series.series_id} and {s.patient_id for s in samples} == {"P1"}


def test_dicom_modality_lut_to_raw(tmp_path):
    stored = np.array([[0, 1, 1000, 4095]] * 512 * 128, np.uint16).reshape(512, 512)
    (path,) = write_dicom_series(tmp_path, stored[None], patient_id="P2", shuffle_names=False)
    ds = pydicom.dcmread(path)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -3000
    ds.save_as(path)
    expected = np.clip(2.0 * stored - 3000 + 1024, 0, 65535).astype(np.uint16)  # HU + 1024
    np.testing.assert_array_equal(read_ct_dicom(path), expected)
    assert expected[0, 0] == 0 and expected[0, 3] == 6214
    np.testing.assert_array_equal(hu_to_raw(np.array([-3024.0, -1024.0, -1000.4, 0.0, 64511.0, 70000.0])),
                                  [0, 0, 24, 1024, 65535, 65535])


def test_dicom_mixed_patients_one_slice_series_and_bad_sizes(tmp_path):
    volume = np.stack([raw_slice(seed, 4096) for seed in range(4)])
    paths = write_dicom_series(tmp_path / "a", volume, patient_id="P1", seed=2)
    intruder = pydicom.dcmread(paths[2])
    intruder.PatientID = "P7"
    intruder.save_as(paths[2])
    write_dicom_series(tmp_path / "b", volume[:1], patient_id="P3", series_number=5)
    small = write_dicom_series(tmp_path / "c", np.zeros((2, 256, 256), np.uint16), patient_id="P4", series_number=6)
    scan = find_ct_series(tmp_path)
    skipped = {(s.path, s.field) for s in scan.skipped}
    assert skipped == {(str(paths[2]), "PatientID"), (str(tmp_path / "b" / "0001.dcm"), "SeriesInstanceUID"),
                       (str(small[0]), "Rows/Columns"), (str(small[1]), "Rows/Columns")}
    (series,) = scan.series
    assert series.paths == tuple(str(p) for p in (paths[0], paths[1], paths[3]))
    assert series.patient_id == "P1"
