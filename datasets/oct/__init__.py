"""OCT B-scan layouts (Duke DME .mat, paired image/label folders, VIA JSON), their readers, and the OCT phantom."""

from clinseg.datasets.oct.bscans import MIN_BSCAN_SIZE, RequireBScand, check_bscan_size
from clinseg.datasets.oct.datalist import load_oct_datalist, load_oct_images, paired_items
from clinseg.datasets.oct.duke import DUKE_CLASS_NAMES, DukeMatReader, bscan_items, duke_items
from clinseg.datasets.oct.phantom import synthesize_bscan, write_phantom_dataset
from clinseg.datasets.oct.via import ViaLabelReader, via_items

__all__ = [
    "DUKE_CLASS_NAMES",
    "MIN_BSCAN_SIZE",
    "DukeMatReader",
    "RequireBScand",
    "ViaLabelReader",
    "bscan_items",
    "check_bscan_size",
    "duke_items",
    "load_oct_datalist",
    "load_oct_images",
    "paired_items",
    "synthesize_bscan",
    "via_items",
    "write_phantom_dataset",
]
