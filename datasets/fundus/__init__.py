"""Fundus photograph readers (DRIVE, generic image/mask folders) and the fundus phantom generator."""

from clinseg.datasets.fundus.datalist import load_fundus_images, load_vessel_datalist
from clinseg.datasets.fundus.phantom import synthesize_fundus, write_drive_layout
from clinseg.datasets.fundus.readers import read_binary_mask, read_drive, read_image_mask_folders, read_rgb

__all__ = [
    "load_fundus_images",
    "load_vessel_datalist",
    "read_binary_mask",
    "read_drive",
    "read_image_mask_folders",
    "read_rgb",
    "synthesize_fundus",
    "write_drive_layout",
]
