"""Readers that turn real release formats into MONAI data lists, and synthetic phantom generators.

A reader ends at a list of dictionaries ``{"image": ..., "label": ..., "id": ..., "source": ...}`` so that every
bundle can use MONAI's ``Dataset``/``CacheDataset`` unchanged.
"""

from . import ct, fundus, oct
from .errors import DataError, NoUsableDataError
from .fingerprint import dataset_fingerprint, file_manifest

__all__ = ["ct", "fundus", "oct", "DataError", "NoUsableDataError", "dataset_fingerprint", "file_manifest"]
