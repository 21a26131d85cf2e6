"""CT readers (DICOM series, NIfTI, NRRD, MetaImage, Decathlon folders) and the chest CT phantom generator."""

from clinseg.datasets.ct.datalist import heart_free_cases, labelled_cases, load_ct_datalist, load_ct_images
from clinseg.datasets.ct.dicom import CTVolume, list_ct_series, read_ct_series, write_ct_series
from clinseg.datasets.ct.phantom import CTPhantom, synthesize_ct, write_msd_dataset
from clinseg.datasets.ct.volumes import CTVolumeReader, LoadCTVolumed, case_id, looks_like_dicom, read_volume

__all__ = [
    "CTPhantom",
    "CTVolume",
    "CTVolumeReader",
    "LoadCTVolumed",
    "case_id",
    "heart_free_cases",
    "labelled_cases",
    "list_ct_series",
    "load_ct_datalist",
    "load_ct_images",
    "looks_like_dicom",
    "read_ct_series",
    "read_volume",
    "synthesize_ct",
    "write_ct_series",
    "write_msd_dataset",
]
