"""Fundus photograph layouts (DRIVE, Kaggle, generic image/mask folders) and the fundus phantom generator."""

from clinseg.datasets.fundus.datalist import (
    drive_split_items,
    image_mask_items,
    load_fundus_images,
    load_vessel_datalist,
)
from clinseg.datasets.fundus.phantom import synthesize_fundus, write_drive_layout

__all__ = [
    "drive_split_items",
    "image_mask_items",
    "load_fundus_images",
    "load_vessel_datalist",
    "synthesize_fundus",
    "write_drive_layout",
]
