"""CT DICOM series reader and writer: geometry, rescale, grouping and every refused input, on tiny written series."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, RLELossless

from clinseg.datasets.ct import read_volume
from clinseg.datasets.ct.dicom import CTVolume, list_ct_series, read_ct_series, write_ct_series
from clinseg.datasets.errors import DataError
from tests.conftest import shared_path

SHAPE = (12, 10, 8)  # columns, rows, slices


def rotation(axis, degrees: float) -> np.ndarray:
    """Rodrigues' rotation matrix about ``axis``."""
    axis = np.asarray(axis, dtype=np.float64)
    axis /= np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.radians(degrees)
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def make_affine(spacing=(0.7, 0.9, 2.5), rotate: float = 0.0, origin=(-100.0, 20.0, 33.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation([0.3, -0.5, 0.8], rotate) * np.asarray(spacing)
    affine[:3, 3] = origin
    return affine


def random_hu(seed: int = 0, shape=SHAPE, low: int = -1024, high: int = 3000) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, size=shape).astype(np.float32)


def edit(path, **attributes) -> None:
    """Rewrite DICOM attributes of one file in place."""
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def test_round_trip_oblique_anisotropic(tmp_path):
    hu, affine = random_hu(), make_affine(rotate=37.0)
    paths = write_ct_series(hu, affine, tmp_path, series_description="oblique")
    volume = read_ct_series(tmp_path)
    assert isinstance(volume, CTVolume)
    assert volume.hu.dtype == np.float32 and volume.hu.shape == SHAPE
    np.testing.assert_array_equal(volume.hu, hu)
    np.testing.assert_allclose(volume.affine_lps, affine, atol=1e-6)
    np.testing.assert_allclose(volume.spacing, (0.7, 0.9, 2.5), atol=1e-6)
    assert volume.files == [str(p) for p in paths]
    assert volume.description == "oblique" and volume.series_uid
    ds = pydicom.dcmread(paths[0])
    assert ds.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert ds.Modality == "CT" and ds.RescaleType == "HU" and ds.Manufacturer == "synthetic"
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([0.9, 0.7])  # [between rows, between columns]
    assert not list(tmp_path.glob(".*")), "the atomic writer left a temporary file"


def test_left_handed_affine_reads_back_reversed(tmp_path):
    hu, affine = random_hu(), make_affine(rotate=15.0)
    affine[:3, 2] *= -1  # slices run against the normal of the image plane
    write_ct_series(hu, affine, tmp_path)
    volume = read_ct_series(tmp_path)
    np.testing.assert_array_equal(volume.hu, hu[:, :, ::-1])
    n = SHAPE[2] - 1
    for i, j, k in [(0, 0, 0), (11, 9, 0), (3, 4, 5), (11, 0, n)]:
        np.testing.assert_allclose(volume.affine_lps @ [i, j, k, 1], affine @ [i, j, n - k, 1], atol=1e-6)
    assert np.linalg.det(volume.affine_lps[:3, :3]) > 0


def test_sorting_ignores_file_names_and_instance_numbers(tmp_path):
    hu, affine = random_hu(1), make_affine(rotate=-60.0)
    paths = write_ct_series(hu, affine, tmp_path, file_names="shuffled", seed=3)
    assert sorted(paths) != paths
    assert [int(pydicom.dcmread(p).InstanceNumber) for p in paths] == list(range(SHAPE[2], 0, -1))
    volume = read_ct_series(tmp_path)
    np.testing.assert_array_equal(volume.hu, hu)
    np.testing.assert_allclose(volume.affine_lps, affine, atol=1e-6)
    assert volume.files == [str(p) for p in paths]


def test_slope_and_intercept(tmp_path):
    hu = -1000.0 + 2.0 * random_hu(2, low=-50, high=1500)
    write_ct_series(hu, make_affine(), tmp_path, slope=2.0, intercept=-1000.0)
    ds = pydicom.dcmread(next(tmp_path.iterdir()))
    assert float(ds.RescaleSlope) == 2.0 and float(ds.RescaleIntercept) == -1000.0
    assert ds.PixelRepresentation == 1  # stored values below 0 need the signed representation
    np.testing.assert_array_equal(read_ct_series(tmp_path).hu, hu)

    # values between the quantisation steps come back within half a step
    smooth = np.random.default_rng(4).uniform(-1000, 2000, SHAPE)
    write_ct_series(smooth, make_affine(), tmp_path / "smooth", slope=2.0, intercept=-1000.0)
    assert np.abs(read_ct_series(tmp_path / "smooth").hu - smooth).max() <= 1.0 + 1e-3


def test_intercept_per_slice(tmp_path):
    hu = random_hu(5, low=-1000, high=2000)
    intercepts = [-1024.0, -1000.0, -2048.0, 0.0, -1024.0, -512.0, -3000.0, -1.0]
    paths = write_ct_series(hu, make_affine(), tmp_path, intercept=intercepts, file_names="shuffled")
    assert [float(pydicom.dcmread(p).RescaleIntercept) for p in paths] == intercepts
    np.testing.assert_array_equal(read_ct_series(tmp_path).hu, hu)


def test_unsigned_pixel_representation(tmp_path):
    hu = random_hu(6, low=-1024, high=3000)
    paths = write_ct_series(hu, make_affine(), tmp_path, intercept=-1024.0)
    assert pydicom.dcmread(paths[0]).PixelRepresentation == 0
    np.testing.assert_array_equal(read_ct_series(tmp_path).hu, hu)


def test_empty_uids_still_read(tmp_path):
    hu, affine = random_hu(7), make_affine(rotate=20.0)
    paths = write_ct_series(hu, affine, tmp_path, anonymise_uids=True, file_names="shuffled")
    ds = pydicom.dcmread(paths[0])
    assert ds.SeriesInstanceUID == "" and ds.SOPInstanceUID == ""
    volume = read_ct_series(tmp_path)
    assert volume.series_uid == ""
    np.testing.assert_array_equal(volume.hu, hu)
    np.testing.assert_allclose(volume.affine_lps, affine, atol=1e-6)


def test_anonymised_series_grouped_by_number(tmp_path):
    write_ct_series(random_hu(8), make_affine(), tmp_path, anonymise_uids=True, series_number=2, series_description="a")
    write_ct_series(random_hu(9), make_affine(), tmp_path, anonymise_uids=True, series_number=3, series_description="b")
    series = list_ct_series(tmp_path)
    assert [(s.number, s.description, s.n_files, s.uid) for s in series] == [(2, "a", 8, ""), (3, "b", 8, "")]
    np.testing.assert_array_equal(read_ct_series(tmp_path, series_description="b").hu, random_hu(9))


def test_jpeg2000_round_trip(tmp_path):
    hu = random_hu(10, shape=(32, 32, 3))  # openjpeg's default 6 resolution levels need 32 x 32 pixels
    write_ct_series(hu, make_affine(), tmp_path, transfer_syntax=JPEG2000Lossless, anonymise_uids=True)
    np.testing.assert_array_equal(read_ct_series(tmp_path).hu, hu)


def test_jpeg_lossless_round_trip(tmp_path):
    """JPEG Lossless, first-order prediction (1.2.840.10008.1.2.4.70), what most PACS export lossless CT as:
    transcoded by GDCM from a series the project wrote, read back voxel for voxel."""
    import gdcm
    from pydicom.uid import JPEGLosslessSV1

    hu = random_hu(11, shape=(24, 20, 3))
    write_ct_series(hu, make_affine(), tmp_path / "raw")
    (tmp_path / "jpeg").mkdir()
    for path in sorted((tmp_path / "raw").iterdir()):
        reader = gdcm.ImageReader()
        reader.SetFileName(str(path))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(tmp_path / "jpeg" / path.name))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
    written = next((tmp_path / "jpeg").iterdir())
    assert pydicom.dcmread(written).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    np.testing.assert_array_equal(read_ct_series(tmp_path / "jpeg").hu, hu)


def test_non_dicom_files_are_ignored(tmp_path):
    write_ct_series(random_hu(), make_affine(), tmp_path)
    (tmp_path / "README").write_text("exported series\n")
    (tmp_path / ".unfinished.dcm.123.tmp").write_bytes(b"\0" * 128 + b"DICM")  # a killed writer's temporary file
    (tmp_path / "sub").mkdir()
    assert read_ct_series(tmp_path).hu.shape == SHAPE


def test_missing_slice(tmp_path):
    paths = write_ct_series(random_hu(), make_affine(spacing=(0.7, 0.9, 2.0), origin=(0, 0, 0)), tmp_path)
    paths[4].unlink()
    with pytest.raises(DataError, match="missing") as error:
        read_ct_series(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "1 slice(s) missing between 6.00 mm" in message and "10.00 mm" in message


def test_duplicated_slice(tmp_path):
    paths = write_ct_series(random_hu(), make_affine(), tmp_path, file_names="index")
    shutil.copy(paths[3], tmp_path / "copy_of_slice_3.dcm")
    with pytest.raises(DataError, match="duplicated slice") as error:
        read_ct_series(tmp_path)
    assert "slice_0003.dcm" in str(error.value) and "copy_of_slice_3.dcm" in str(error.value)


def acquisition(paths, **attributes) -> list:
    """Set acquisition attributes (``AcquisitionNumber=2``...) on written slices, as a scanner numbers its phases."""
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
    return paths


def test_phases_of_one_series_are_refused_naming_what_tells_them_apart(tmp_path):
    """A multi-phase cardiac CT under one series UID: each position holds one slice per phase. Told apart by their
    attributes, the refusal says so (they are not copies to remove)."""
    uid = "1.2.3.4.5"
    folder = tmp_path / "phases"
    for phase, seed in ((0, 1), (40, 2)):
        acquisition(
            write_ct_series(random_hu(seed), make_affine(), folder, series_uid=uid, seed=seed),
            AcquisitionNumber=1,
            NominalPercentageOfCardiacPhase=phase,
        )
    with pytest.raises(DataError) as refused:
        read_ct_series(folder)
    message = str(refused.value)
    assert "several acquisitions at the same slice positions" in message, message
    assert "differ in NominalPercentageOfCardiacPhase (" in message, message  # and in nothing else
    assert "Remove the copies" not in message


def test_interleaved_acquisitions_are_refused_and_consecutive_ones_are_one_volume(tmp_path):
    """Two acquisitions offset by half a slice sort into one evenly spaced stack alternating between them (a
    plausible volume of twice the slices); acquisitions one after the other along the body are one volume."""
    uid = "1.2.3.4.6"
    first, second = random_hu(3), random_hu(4, low=0, high=100)
    offset = make_affine()
    offset[:3, 3] += offset[:3, 2] / 2  # half a slice along the slice normal
    acquisition(write_ct_series(first, make_affine(), tmp_path / "mixed", series_uid=uid, seed=3), AcquisitionNumber=1)
    acquisition(write_ct_series(second, offset, tmp_path / "mixed", series_uid=uid, seed=4), AcquisitionNumber=2)
    with pytest.raises(DataError) as refused:
        read_ct_series(tmp_path / "mixed")
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'mixed'}: the series interleaves slices of several acquisitions"), message
    assert "AcquisitionNumber 1" in message and "AcquisitionNumber 2" in message

    paths = write_ct_series(first, make_affine(), tmp_path / "consecutive", series_uid=uid, seed=5, file_names="index")
    half = len(paths) // 2
    acquisition(paths[:half], AcquisitionNumber=1)
    acquisition(paths[half:], AcquisitionNumber=2)
    np.testing.assert_array_equal(read_ct_series(tmp_path / "consecutive").hu, first)


def test_a_screenshot_under_the_series_uid_is_left_out_and_reformatted_slices_are_kept(tmp_path):
    """A dose report's page saved as Secondary Capture (RGB, no geometry) under the CT's own series UID refused the
    whole series ("has no ImageOrientationPatient"); it is left out as a scout is. Slices marked DERIVED\\SECONDARY
    (a reformat) are CT slices."""
    from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

    hu = random_hu(21)
    paths = write_ct_series(hu, make_affine(), tmp_path, series_uid="1.2.3.4.8", file_names="index")
    acquisition(paths, ImageType=["DERIVED", "SECONDARY", "AXIAL"])
    screen = pydicom.dcmread(paths[0])
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope",
                    "RescaleIntercept", "SliceThickness"):  # fmt: skip
        if keyword in screen:
            delattr(screen, keyword)
    screen.SOPClassUID = screen.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    screen.SOPInstanceUID = screen.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    screen.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]
    screen.PhotometricInterpretation, screen.SamplesPerPixel, screen.PlanarConfiguration = "RGB", 3, 0
    screen.Rows, screen.Columns, screen.BitsAllocated, screen.BitsStored, screen.HighBit = 8, 12, 8, 8, 7
    screen.PixelRepresentation = 0
    screen.PixelData = np.zeros((8, 12, 3), np.uint8).tobytes()
    screen.save_as(tmp_path / "zz_dose_screen.dcm")
    np.testing.assert_array_equal(read_ct_series(tmp_path).hu, hu)
    # grey Secondary Capture slices with their geometry, as ITK and many converters write a CT, are slices
    converted = write_ct_series(hu, make_affine(), tmp_path / "itk", series_uid="1.2.3.4.9", file_names="index")
    acquisition(converted, SOPClassUID=SecondaryCaptureImageStorage)
    np.testing.assert_array_equal(read_ct_series(tmp_path / "itk").hu, hu)
    for path in paths:
        path.unlink()
    with pytest.raises(DataError, match="holds only localizer .* or screenshots"):
        read_ct_series(tmp_path)


def test_values_beyond_the_stored_bits_are_refused_and_fitting_ones_read(tmp_path):
    """BitsStored 12 with a padding of -3024 written whole: the standard reads 12 bits, so the padding becomes +1072
    HU (bone around the body, a heart segmented in a plausible wrong input). -2000 fits 12 signed bits."""
    for padding, fits in ((-2000, True), (-3024, False)):
        hu = random_hu(22, low=-1000, high=1500)
        hu[:2, :2, :] = padding
        folder = tmp_path / str(-padding)
        acquisition(write_ct_series(hu, make_affine(), folder, intercept=0.0), BitsStored=12, HighBit=11)
        if fits:
            np.testing.assert_array_equal(read_ct_series(folder).hu, hu)
            continue
        with pytest.raises(DataError, match=r"stores values that do not fit its BitsStored \(12 of 16 bits\): "):
            read_ct_series(folder)
    # negative values in 12 bits with the unused high bits left 0 (the standard leaves them undefined) are read
    hu = random_hu(24, low=-1000, high=1500)
    hu[:2, :2, :] = -2000
    folder = tmp_path / "unextended"
    for path in write_ct_series(hu, make_affine(), folder, intercept=0.0):
        ds = pydicom.dcmread(path)
        ds.BitsStored, ds.HighBit = 12, 11
        ds.PixelData = (ds.pixel_array.astype(np.int16).view(np.uint16) & 0x0FFF).astype("<u2").tobytes()
        ds.save_as(path)
    np.testing.assert_array_equal(read_ct_series(folder).hu, hu)


def test_files_without_a_file_meta_are_read_in_the_encoding_found(tmp_path):
    """ACR-NEMA-style files (no preamble, no group 0002): the decoder needs a transfer syntax, taken from how the
    data set was read (implicit VR, little endian), not "cannot be decoded ... truncated?"."""
    hu = random_hu(23)
    for path in write_ct_series(hu, make_affine(), tmp_path / "with_meta", file_names="index"):
        ds = pydicom.dcmread(path)
        ds.preamble, ds.file_meta = None, pydicom.dataset.FileMetaDataset()
        (tmp_path / "bare").mkdir(exist_ok=True)
        ds.save_as(tmp_path / "bare" / path.stem, implicit_vr=True, little_endian=True, enforce_file_format=False)
    np.testing.assert_array_equal(read_ct_series(tmp_path / "bare").hu, hu)


def test_two_series_need_a_selector(tmp_path):
    first, second = random_hu(11), random_hu(12)
    write_ct_series(first, make_affine(), tmp_path, series_uid="1.2.3.4.1", series_description="Body 3.0 Br38")
    write_ct_series(second, make_affine(rotate=10.0), tmp_path, series_uid="1.2.3.4.2", series_description="Lung")
    assert {s.uid for s in list_ct_series(tmp_path)} == {"1.2.3.4.1", "1.2.3.4.2"}
    with pytest.raises(DataError, match="holds 2 series") as error:
        read_ct_series(tmp_path)
    message = str(error.value)
    expected = ["1.2.3.4.1", "1.2.3.4.2", "'Body 3.0 Br38'", "'Lung'", "files=8", "series_uid=", "series_description="]
    assert all(text in message for text in expected), message
    np.testing.assert_array_equal(read_ct_series(tmp_path, series_uid="1.2.3.4.2").hu, second)
    np.testing.assert_array_equal(read_ct_series(tmp_path, series_description="Lung").hu, second)
    np.testing.assert_array_equal(read_ct_series(tmp_path, series_description="body 3.0").hu, first)
    with pytest.raises(DataError, match="no series matches series_uid='9.9'") as error:
        read_ct_series(tmp_path, series_uid="9.9")
    assert "1.2.3.4.1" in str(error.value) and "'Lung'" in str(error.value)


def test_inconsistent_rows_is_a_mixed_series(tmp_path):
    paths = write_ct_series(random_hu(), make_affine(), tmp_path, file_names="index")
    ds = pydicom.dcmread(paths[5])
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[:-2]).tobytes()
    ds.Rows = SHAPE[1] - 2
    ds.save_as(paths[5])
    with pytest.raises(DataError, match="mixed series: Rows is 8") as error:
        read_ct_series(tmp_path)
    assert str(paths[5]) in str(error.value)


def test_non_ct_modality(tmp_path):
    paths = write_ct_series(random_hu(), make_affine(), tmp_path)
    for path in paths:
        edit(path, Modality="MR")
    with pytest.raises(DataError, match="modality MR, expected CT"):
        read_ct_series(tmp_path)
    assert read_ct_series(tmp_path, allow_non_ct=True).hu.shape == SHAPE


PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian


@pytest.mark.parametrize(
    ("cut", "problem"),
    [
        (lambda data: 0, "no 'DICM' marker"),
        (lambda data: len(data) // 2, "incomplete DICOM header"),
        (lambda data: data.rfind(PIXEL_DATA_TAG) + 6, "no pixel data"),
        (lambda data: len(data) - 40, "pixel data cannot be decoded"),
    ],
    ids=["empty", "in-header", "in-pixel-data-header", "in-pixel-data"],
)
def test_truncated_file(tmp_path, cut, problem):
    paths = write_ct_series(random_hu(), make_affine(), tmp_path, file_names="index")
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: cut(data)])
    with pytest.raises(DataError, match=problem) as error:
        read_ct_series(tmp_path)
    assert str(paths[2]) in str(error.value)


def test_undecodable_compressed_pixel_data(tmp_path):
    paths = write_ct_series(random_hu(), make_affine(), tmp_path, file_names="index", transfer_syntax=RLELossless)
    ds = pydicom.dcmread(paths[1])
    ds.PixelData = encapsulate([b"\x07" * 64])  # an RLE header that promises 7 segments which are not there
    ds.save_as(paths[1])
    with pytest.raises(DataError, match="pixel data cannot be decoded") as error:
        read_ct_series(tmp_path)
    message = str(error.value)
    assert str(paths[1]) in message and "RLE Lossless" in message and "pylibjpeg-openjpeg" in message


def test_no_dicom_files(tmp_path):
    (tmp_path / "README.txt").write_text("nothing here\n")
    with pytest.raises(DataError, match="no DICOM image files") as error:
        read_ct_series(tmp_path)
    assert str(tmp_path) in str(error.value)
    with pytest.raises(DataError, match="does not exist"):
        read_ct_series(tmp_path / "absent")


def test_unequal_spacing(tmp_path):
    paths = write_ct_series(random_hu(), make_affine(spacing=(1, 1, 2), origin=(0, 0, 0)), tmp_path, file_names="index")
    edit(paths[-1], ImagePositionPatient=[0, 0, 14.5])  # the last step is 2.5 mm instead of 2
    with pytest.raises(DataError, match="unequal slice spacing") as error:
        read_ct_series(tmp_path)
    assert "slice_0007.dcm" in str(error.value)


def test_missing_position(tmp_path):
    paths = write_ct_series(random_hu(), make_affine(), tmp_path, file_names="index")
    ds = pydicom.dcmread(paths[6])
    del ds.ImagePositionPatient
    ds.save_as(paths[6])
    with pytest.raises(DataError, match=r"no ImagePositionPatient \(0020,0032\)") as error:
        read_ct_series(tmp_path)
    assert str(paths[6]) in str(error.value)


def test_single_slice(tmp_path):
    write_ct_series(random_hu(shape=(12, 10, 1)), make_affine(), tmp_path)
    with pytest.raises(DataError, match="only slice of its series"):
        read_ct_series(tmp_path)


def test_real_anonymised_jpeg2000_series():
    folder = shared_path("ct", "totalsegmentator", "example_ct_dicom")
    [series] = list_ct_series(folder)
    assert series.uid == "" and series.n_files == 20 and series.modality == "CT"
    volume = read_ct_series(folder)
    assert volume.hu.shape == (512, 512, 20)
    np.testing.assert_allclose(volume.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-6)
    assert volume.hu.min() == pytest.approx(-1024, abs=1)
    assert 1000 < volume.hu.max() < 3000
    np.testing.assert_allclose(volume.affine_lps[:3, :3], np.diag(volume.spacing), atol=1e-6)
    positions = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in volume.files]
    assert positions == sorted(positions) and len(set(positions)) == 20


# --- values that are not Hounsfield units, and multi-frame files


def delete(path, *keywords) -> None:
    ds = pydicom.dcmread(path)
    for keyword in keywords:
        delattr(ds, keyword)
    ds.save_as(path)


@pytest.mark.parametrize(
    "missing",
    [("RescaleIntercept",), ("RescaleSlope", "RescaleIntercept")],
    ids=["intercept", "slope-and-intercept"],
)
def test_ct_without_rescale_attributes_is_refused(tmp_path, missing):
    # the stored values are HU + 1024: read with an intercept of 0 they gave a plausible, wrong image
    paths = write_ct_series(random_hu(), make_affine(), tmp_path, intercept=-1024.0, file_names="index")
    delete(paths[3], *missing)
    with pytest.raises(DataError, match="cannot be converted to Hounsfield units") as error:
        read_ct_series(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{paths[3]}: has no ") and "RescaleIntercept (0028,1052)" in message


def test_non_ct_without_rescale_attributes_reads_with_slope_1_and_intercept_0(tmp_path):
    hu = random_hu(low=0, high=2000)
    paths = write_ct_series(hu, make_affine(), tmp_path, intercept=0.0)
    for path in paths:
        edit(path, Modality="MR")
        delete(path, "RescaleSlope", "RescaleIntercept", "RescaleType")
    np.testing.assert_array_equal(read_ct_series(tmp_path, allow_non_ct=True).hu, hu)


def test_rescale_slope_zero_is_refused(tmp_path):
    paths = write_ct_series(random_hu(), make_affine(), tmp_path, file_names="index")
    edit(paths[0], RescaleSlope="0")
    with pytest.raises(DataError, match=r"RescaleSlope \(0028,1053\) is 0") as error:
        read_ct_series(tmp_path)
    assert str(paths[0]) in str(error.value)


@pytest.mark.parametrize("rescale_type", ["US", "MGML"])
def test_rescale_type_other_than_hu_is_refused(tmp_path, rescale_type):
    paths = write_ct_series(random_hu(), make_affine(), tmp_path, file_names="index")
    for path in paths:
        edit(path, RescaleType=rescale_type)
    with pytest.raises(DataError, match=f"RescaleType \\(0028,1054\\) is '{rescale_type}', not HU") as error:
        read_ct_series(tmp_path)
    assert str(error.value).startswith(str(paths[0]))
    for path in paths:
        edit(path, RescaleType="hu")  # the case is not significant
    np.testing.assert_array_equal(read_ct_series(tmp_path).hu, random_hu())


def test_series_without_intercept_and_no_value_below_zero_is_not_hounsfield_units(tmp_path):
    # an intercept of 0 written, unsigned stored values HU + 1024: the header is complete, the values are not HU
    stored = random_hu() + 1024
    write_ct_series(stored, make_affine(), tmp_path / "stored", intercept=0.0)
    with pytest.raises(DataError, match="does not look like Hounsfield units") as error:
        read_volume(tmp_path / "stored")
    assert str(error.value).startswith(f"{tmp_path / 'stored'}: ")
    assert read_volume(tmp_path / "stored", check_hu=False)[0].min() >= 0
    write_ct_series(random_hu(), make_affine(), tmp_path / "hu", intercept=0.0)  # signed, HU as stored
    np.testing.assert_array_equal(read_volume(tmp_path / "hu")[0], random_hu())


def enhanced_ct(path, source, frames: int = 6):
    """An Enhanced CT Image Storage file as a scanner writes one: all frames in one file, the geometry in functional
    group sequences (here absent: the reader must refuse it before looking for it)."""
    ds = pydicom.dcmread(source)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.NumberOfFrames = frames
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness"):
        delattr(ds, keyword)
    ds.PixelData = np.zeros((frames, ds.Rows, ds.Columns), np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_enhanced_multi_frame_ct_is_refused_as_multi_frame(tmp_path):
    [source] = write_ct_series(random_hu(shape=(12, 10, 1)), make_affine(), tmp_path / "source")
    folder = tmp_path / "enhanced"
    folder.mkdir()
    path = enhanced_ct(folder / "enhanced.dcm", source)
    with pytest.raises(DataError) as error:
        read_ct_series(folder)
    message = str(error.value)
    assert message.startswith(f"{path}: is a multi-frame image (Enhanced CT Image Storage, 6 frame(s) in one file)")
    assert "multi-frame DICOM is not supported" in message and "only slice" not in message
    enhanced_ct(folder / "enhanced2.dcm", source)  # two such files: still multi-frame, not a geometry problem
    with pytest.raises(DataError, match="multi-frame DICOM is not supported"):
        read_ct_series(folder)
