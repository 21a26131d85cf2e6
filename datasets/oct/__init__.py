"""OCT B-scan readers (Duke DME .mat, paired image/label folders, VIA JSON) and the OCT phantom generator."""

from clinseg.datasets.oct.datalist import load_oct_datalist, load_oct_images
from clinseg.datasets.oct.duke import DUKE_CLASS_NAMES, read_duke_mat, read_mat_bscans
from clinseg.datasets.oct.paired import read_paired_folder
from clinseg.datasets.oct.phantom import synthesize_bscan, write_phantom_dataset
from clinseg.datasets.oct.via import read_via_json

__all__ = [
    "DUKE_CLASS_NAMES",
    "load_oct_datalist",
    "load_oct_images",
    "read_duke_mat",
    "read_mat_bscans",
    "read_paired_folder",
    "read_via_json",
    "synthesize_bscan",
    "write_phantom_dataset",
]
