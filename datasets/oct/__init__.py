"""OCT B-scan readers (Duke DME .mat, paired image/label folders, VIA JSON) and the OCT phantom generator."""

from .datalist import load_oct_datalist, load_oct_images
from .duke import DUKE_CLASS_NAMES, read_duke_mat, read_mat_bscans
from .paired import read_paired_folder
from .phantom import synthesize_bscan, write_phantom_dataset
from .via import read_via_json

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
