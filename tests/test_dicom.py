"""DICOM reading: modality LUT, VOI window/LUT, MONOCHROME1, clear errors, folder reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, generate_uid

from caaxr_tf.data.dicom import read_dicom, read_dicom_dir, window
from caaxr_tf.data.images import load_image
from caaxr_tf.data.records import InputError

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def write_dicom(
    path: Path,
    pixels: np.ndarray | None,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    signed: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
    encapsulated: bytes | None = None,
    **elements,
) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "P1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.astype("<i2" if signed else "<u2").tobytes()
    elif encapsulated is not None:
        ds.Rows, ds.Columns = 4, 4
        ds.PixelData = encapsulate([encapsulated])
        ds["PixelData"].VR = "OB"
    for keyword, value in elements.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


STORED = np.array([[0, 100, 1000, 2000], [2047, 2048, 3000, 4095]], dtype=np.uint16)


def linear_window_reference(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 written out piecewise, scaled to 0..65535."""
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    y = np.where(
        x <= low, 0.0, np.where(x > high, 1.0, (x - (center - 0.5)) / (width - 1) + 0.5)
    )
    return np.rint(y * 65535).astype(np.uint16)


def test_no_window_scales_the_stored_range(tmp_path):
    image = read_dicom(write_dicom(tmp_path / "a.dcm", STORED))
    assert image.bit_depth == 16 and image.pixels.dtype == np.uint16
    expected = np.rint(STORED / 4095 * 65535).astype(np.uint16)
    np.testing.assert_array_equal(image.pixels, expected)
    assert image.pixels[1, 3] == 65535 and image.pixels[0, 0] == 0


def test_rescale_then_window(tmp_path):
    path = write_dicom(
        tmp_path / "w.dcm", STORED, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=1000, WindowWidth=2001
    )
    expected = linear_window_reference(STORED * 2.0 - 1024, 1000, 2001)
    np.testing.assert_array_equal(read_dicom(path).pixels, expected)
    # Values inside the window spread over the range; the others clip to its ends.
    assert expected[0, 1] == 0 and 0 < expected[0, 2] < 65535 and expected[0, 3] == 65535


def test_monochrome1_is_inverted_after_the_window(tmp_path):
    path = write_dicom(tmp_path / "m1.dcm", STORED, photometric="MONOCHROME1", WindowCenter=2048, WindowWidth=4096)
    expected = 65535 - linear_window_reference(STORED.astype(np.float64), 2048, 4096)
    np.testing.assert_array_equal(read_dicom(path).pixels, expected)
    assert read_dicom(path).pixels[0, 0] == 65535  # stored 0 is white in MONOCHROME1


def test_signed_pixels_with_rescale_use_the_rescaled_stored_range(tmp_path):
    stored = np.array([[-2048, -1, 0, 2047]], dtype=np.int16)
    path = write_dicom(tmp_path / "s.dcm", stored, signed=True, RescaleSlope=0.5, RescaleIntercept=10)
    values = stored * 0.5 + 10
    low, high = -2048 * 0.5 + 10, 2047 * 0.5 + 10
    expected = np.rint((values - low) / (high - low) * 65535).astype(np.uint16)
    np.testing.assert_array_equal(read_dicom(path).pixels, expected)


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_voi_lut_sequence_is_preferred_to_the_window(tmp_path, vr):
    item = Dataset()
    item.add_new(0x00283002, "US", [4, 1000, 12])  # LUTDescriptor: 4 entries from 1000, 12 bits
    data = [0, 1000, 3000, 4095]
    item.add_new(0x00283006, vr, data if vr == "US" else np.array(data, "<u2").tobytes())  # LUTData
    path = write_dicom(
        tmp_path / "lut.dcm", STORED, VOILUTSequence=Sequence([item]), WindowCenter=10, WindowWidth=20
    )
    lut = np.array([0, 1000, 3000, 4095], dtype=np.float64)
    index = np.clip(STORED.astype(np.int64) - 1000, 0, 3)
    expected = np.rint(lut[index] / 4095 * 65535).astype(np.uint16)
    np.testing.assert_array_equal(read_dicom(path).pixels, expected)


def test_sigmoid_and_linear_exact_windows():
    x = np.array([0.0, 40.0, 50.0, 60.0, 100.0])
    np.testing.assert_allclose(window(x, 50, 20, "SIGMOID"), 1 / (1 + np.exp(-4 * (x - 50) / 20)))
    np.testing.assert_allclose(window(x, 50, 20, "LINEAR_EXACT"), [0, 0, 0.5, 1, 1])


def test_load_image_dispatches_dicom(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", STORED)
    image = load_image(path)
    assert (image.height, image.width, image.bit_depth) == (2, 4, 16)


def test_bad_window_width_names_the_field(tmp_path):
    path = write_dicom(tmp_path / "bad.dcm", STORED, WindowCenter=100, WindowWidth=0)
    with pytest.raises(InputError) as caught:
        read_dicom(path)
    assert (caught.value.path, caught.value.field) == (str(path), "WindowWidth")


def test_jpeg2000_with_bad_data_gives_a_clear_error(tmp_path):
    path = write_dicom(tmp_path / "j2k.dcm", None, transfer_syntax=JPEG2000Lossless, encapsulated=b"\x00" * 64)
    with pytest.raises(InputError) as caught:
        read_dicom(path)
    error = caught.value
    assert error.path == str(path) and "j2k.dcm" in str(error)
    assert "JPEG 2000" in error.reason and str(JPEG2000Lossless) in error.reason
    if get_decoder(JPEG2000Lossless).is_available:  # Pillow with OpenJPEG decodes J2K
        assert error.field == "PixelData"
    else:
        assert error.field == "TransferSyntaxUID" and "pylibjpeg" in error.reason


def test_compressed_syntax_without_decoder_names_package(tmp_path):
    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    path = write_dicom(tmp_path / "jls.dcm", None, transfer_syntax=JPEGLSLossless, encapsulated=b"\x00" * 64)
    with pytest.raises(InputError) as caught:
        read_dicom(path)
    error = caught.value
    assert (error.path, error.field) == (str(path), "TransferSyntaxUID")
    assert "JPEG-LS Lossless" in error.reason
    assert "pip install pyjpegls" in error.reason and "pip install python-gdcm" in error.reason


def test_non_dicom_file_and_missing_pixel_data(tmp_path):
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"this is not a DICOM file at all" * 10)
    with pytest.raises(InputError) as caught:
        read_dicom(fake)
    assert (caught.value.path, caught.value.field) == (str(fake), "file")

    empty = write_dicom(tmp_path / "nopix.dcm", None)
    with pytest.raises(InputError) as caught:
        read_dicom(empty)
    assert (caught.value.path, caught.value.field) == (str(empty), "PixelData")


def test_read_dicom_dir(tmp_path):
    pa = write_dicom(tmp_path / "p1" / "pa.dcm", STORED, ViewPosition="PA", StudyInstanceUID="1.2.3")
    write_dicom(tmp_path / "p1" / "lat.dcm", STORED, ViewPosition="LL")
    no_view = write_dicom(tmp_path / "p2" / "img", STORED, PatientID="P2", SOPInstanceUID=None)  # no suffix
    no_patient = write_dicom(tmp_path / "p3" / "anon.dcm", STORED, PatientID=None)
    no_pixels = write_dicom(tmp_path / "p4" / "sr.dcm", None)
    (tmp_path / "notes.txt").write_text("not an image")
    jls = write_dicom(tmp_path / "p5" / "jls.dcm", None, transfer_syntax=JPEGLSLossless, encapsulated=b"\x00")

    result = read_dicom_dir(tmp_path, labels={"COVID-19": 1.0})

    assert result.excluded == {"non-frontal view": 1}
    skipped = {(Path(s.path).name, s.field) for s in result.skipped}
    expected_skips = {(no_patient.name, "PatientID"), (no_pixels.name, "PixelData")}
    if not get_decoder(JPEGLSLossless).is_available:
        expected_skips.add((jls.name, "TransferSyntaxUID"))
    assert skipped == expected_skips
    samples = {Path(s.path).name: s for s in result.samples}
    decodable = {jls.name} if get_decoder(JPEGLSLossless).is_available else set()
    assert set(samples) == {pa.name, no_view.name} | decodable
    first = samples[pa.name]
    assert (first.patient_id, first.view, first.study_id, first.source, first.labels) == (
        "P1", "pa", "1.2.3", "dicom", {"COVID-19": 1.0}
    )
    assert len(first.image_id) > 10 and first.image_id != "pa"  # the SOPInstanceUID
    unnamed = samples["img"]  # no SOPInstanceUID: the file stem
    assert (unnamed.image_id, unnamed.patient_id, unnamed.view) == ("img", "P2", "")
