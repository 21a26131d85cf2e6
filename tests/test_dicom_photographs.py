"""Photographs and scans stored as DICOM, as hospitals keep them, on real files written here with pydicom: Ophthalmic
Photography in RGB and in JPEG baseline (YBR_FULL_422, the cameras' usual encoding), MONOCHROME1 and 16-bit grey
scans read as displayed; a listing of photographs takes them; other modalities, several frames and files that are not
DICOM are refused naming the file."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from clinseg.datasets.errors import DataError
from clinseg.datasets.fundus import load_fundus_images
from clinseg.datasets.readers import PhotoReader, read_header

OPHTHALMIC_PHOTOGRAPHY_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
OPHTHALMIC_TOMOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def write_dicom(path, pixels: np.ndarray, modality="OP", sop_class=OPHTHALMIC_PHOTOGRAPHY_8BIT, **attributes):
    """A DICOM image of ``pixels`` ((rows, cols) grey or (rows, cols, 3) RGB; (frames, rows, cols) with
    ``NumberOfFrames``), uncompressed unless ``jpeg`` bytes are given in ``attributes``."""
    jpeg = attributes.pop("jpeg", None)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg is not None else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = modality, "anonymous"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    colour = pixels.ndim == 3 and pixels.shape[-1] == 3
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8 * pixels.dtype.itemsize
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    if jpeg is not None:
        ds.PixelData = encapsulate([jpeg])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def photograph(rows=48, cols=64) -> np.ndarray:
    """A smooth RGB field (JPEG keeps it within a few levels)."""
    y, x = np.mgrid[0:rows, 0:cols]
    return np.stack([120 + 60 * np.sin(x / 9), 80 + 40 * np.cos(y / 7), 30 + x % 5], axis=-1).astype(np.uint8)


def test_an_rgb_ophthalmic_photograph_reads_as_its_pixels(tmp_path):
    pixels = photograph()
    path = write_dicom(tmp_path / "fundus.dcm", pixels)
    assert read_header(path)["shape"] == (48, 64)
    array, meta = PhotoReader("rgb").decode(path)
    np.testing.assert_array_equal(array, np.moveaxis(pixels, -1, 0).astype(np.float32))
    assert meta["format"] == "DICOM"


def test_a_jpeg_ophthalmic_photograph_in_ybr_reads_as_rgb(tmp_path):
    """Fundus cameras store JPEG baseline with YBR_FULL_422: read as YCbCr it would be a green-purple image whose
    'green channel' is luma."""
    pixels = photograph()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    path = write_dicom(
        tmp_path / "fundus.dcm", pixels, jpeg=buffer.getvalue(), PhotometricInterpretation="YBR_FULL_422"
    )
    array, _ = PhotoReader("rgb").decode(path)
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float32)
    assert np.abs(array - np.moveaxis(expected, -1, 0)).max() <= 3  # JPEG decoders round differently
    assert np.abs(array - np.moveaxis(pixels, -1, 0)).mean() < 3


def test_monochrome1_and_16_bit_scans_read_as_displayed(tmp_path):
    scan = np.tile(np.linspace(0, 4095, 64, dtype=np.uint16), (40, 1))  # 12 bits used in a 16-bit container
    path = write_dicom(tmp_path / "scan.dcm", scan, modality="OPT", sop_class=OPHTHALMIC_TOMOGRAPHY, BitsStored=12)
    array, meta = PhotoReader("grey").decode(path)
    np.testing.assert_allclose(array[0], scan * (255.0 / 4095), atol=1e-3)
    assert meta["bits_stored"] == 12
    inverted = write_dicom(tmp_path / "inverted.dcm", scan, PhotometricInterpretation="MONOCHROME1", BitsStored=12)
    np.testing.assert_allclose(PhotoReader("grey").decode(inverted)[0][0], (4095 - scan) * (255.0 / 4095), atol=1e-3)


def test_dicom_photographs_are_listed_for_inference(tmp_path, caplog):
    write_dicom(tmp_path / "a.dcm", photograph())
    Image.fromarray(photograph()).save(tmp_path / "b.png")
    with caplog.at_level(logging.WARNING):
        assert [item["id"] for item in load_fundus_images(tmp_path)] == ["a", "b"]


@pytest.mark.parametrize(
    "kind, problem",
    [
        ("ct", "is a DICOM image of modality CT, not a photograph or a scan: expected one of OP"),
        ("no_modality", "is a DICOM file without a Modality, not a photograph or a scan"),
        ("frames", "holds 3 frames (pages); expected one 2D image"),
        ("signed", "stores signed pixel values"),
        ("not_dicom", "is named as DICOM but is not a DICOM file"),
        ("truncated", "cannot be"),
    ],
)
def test_dicom_that_is_not_one_photograph_is_refused_naming_the_file(tmp_path, kind, problem):
    path = tmp_path / f"{kind}.dcm"
    if kind == "ct":
        write_dicom(path, np.zeros((8, 8), np.uint16), modality="CT", sop_class=CT_IMAGE)
    elif kind == "no_modality":
        write_dicom(path, photograph(), modality="")
    elif kind == "frames":
        volume = np.zeros((3, 8, 8), np.uint8)
        write_dicom(path, volume, modality="OPT", sop_class=OPHTHALMIC_TOMOGRAPHY, NumberOfFrames=3)
    elif kind == "signed":
        write_dicom(path, np.zeros((8, 8), np.uint16), PixelRepresentation=1)
    elif kind == "not_dicom":
        Image.fromarray(photograph()).save(path, format="PNG")
    else:
        whole = write_dicom(tmp_path / "whole.dcm", photograph()).read_bytes()
        path.write_bytes(whole[: len(whole) - 2000])
    with pytest.raises(DataError) as refused:
        PhotoReader("rgb").decode(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message, message


def test_a_multi_frame_oct_volume_is_segmented_b_scan_by_b_scan(tmp_path):
    """Ophthalmic Tomography stores an OCT volume as one multi-frame file: each frame is a B-scan to segment,
    named ``scan.dcm::k`` as a Duke .mat B-scan is."""
    from clinseg.datasets.oct.datalist import load_oct_images

    rng = np.random.default_rng(0)
    volume = rng.integers(0, 255, (3, 40, 64), dtype=np.uint8)
    write_dicom(tmp_path / "scan.dcm", volume, modality="OPT", sop_class=OPHTHALMIC_TOMOGRAPHY, NumberOfFrames=3)
    items = load_oct_images(tmp_path, min_size=32)
    assert [item["id"] for item in items] == ["scan_bscan000", "scan_bscan001", "scan_bscan002"]
    assert [item["image"] for item in items] == [f"{tmp_path / 'scan.dcm'}::{k}" for k in range(3)]
    for k, item in enumerate(items):
        array, _ = PhotoReader("grey").decode(item["image"])
        np.testing.assert_array_equal(array[0], volume[k].astype(np.float32))
    with pytest.raises(DataError, match=r"scan.dcm: has 3 frames; frame 3 does not exist"):
        PhotoReader("grey").decode(f"{tmp_path / 'scan.dcm'}::3")
    Image.fromarray(volume[0]).save(tmp_path / "b.png")
    with pytest.raises(DataError, match=r"b.png::1: names a frame of a file that is not a multi-frame DICOM or"):
        read_header(f"{tmp_path / 'b.png'}::1")
    with pytest.raises(DataError, match=r"is smaller than|at least"):  # each frame is checked as a B-scan
        load_oct_images(tmp_path, min_size=48)
