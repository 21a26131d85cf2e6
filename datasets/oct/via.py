"""VGG Image Annotator (VIA) / makesense.ai "VGG JSON" polygon exports, rasterised to label maps.

This is how OCTID users and many small labs annotate: one JSON file with, per image, a list of regions whose
``shape_attributes`` are polygons (or rectangles) and whose ``region_attributes`` name the class. A data list names
an image's regions as ``export.json::image.png``; :class:`ViaLabelReader` rasterises them on the image's grid (its
size from the image file's header).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.data import ImageReader
from monai.utils import MetaKeys, ensure_tuple
from skimage.draw import polygon as fill_polygon

from clinseg.datasets.errors import DataError
from clinseg.datasets.readers import MAX_PIXELS, member_path, read_header, split_member
from clinseg.datasets.value_types import PositiveInt

logger = logging.getLogger(__name__)


def _region_class(region: dict, class_names: list[str], attribute: str | None, json_path: Path, filename: str) -> int:
    attributes = region.get("region_attributes") or {}
    if attribute is not None:
        value = attributes.get(attribute)
    else:
        value = next((v for v in attributes.values() if isinstance(v, str) and v), None)
    if value is None:
        raise DataError(json_path, f"a region of {filename!r} has no class attribute (region_attributes={attributes}).")
    lookup = {name.lower(): index for index, name in enumerate(class_names)}
    if str(value).lower() not in lookup:
        raise DataError(json_path, f"region class {value!r} of {filename!r} is not one of the classes {class_names}.")
    return lookup[str(value).lower()]


OUTSIDE_TOLERANCE = 1.0
"""How far (pixels) past the image's edge a region's point may lie: annotation tools place points on the edge itself
(x = width); a point further out was drawn on another size of the image."""


def _rasterise(shape: dict, out_shape: tuple[int, int], json_path: Path, filename: str):
    name = shape.get("name")
    if name in ("polygon", "polyline"):
        xs, ys = shape.get("all_points_x"), shape.get("all_points_y")
        if not xs or not ys or len(xs) != len(ys) or len(xs) < 3:
            raise DataError(json_path, f"a polygon of {filename!r} has too few or unpaired points.")
        ys, xs = np.asarray(ys, float), np.asarray(xs, float)
    elif name == "rect":
        x, y, w, h = (float(shape[k]) for k in ("x", "y", "width", "height"))
        ys, xs = np.array([y, y, y + h, y + h]), np.array([x, x + w, x + w, x])
    else:
        raise DataError(json_path, f"region shape {name!r} of {filename!r} is not supported (polygon, polyline, rect).")
    if not (np.isfinite(xs).all() and np.isfinite(ys).all()):
        raise DataError(json_path, f"a region of {filename!r} has points that are not numbers.")
    rows, cols = out_shape
    low, high = -OUTSIDE_TOLERANCE, np.array([cols, rows]) + OUTSIDE_TOLERANCE
    if xs.min() < low or ys.min() < low or xs.max() > high[0] or ys.max() > high[1]:
        # clipped to the image, such a region would be a plausible label map of the wrong shapes
        raise DataError(
            json_path,
            f"a region of {filename!r} spans x {xs.min():g}..{xs.max():g}, y {ys.min():g}..{ys.max():g}, outside the "
            f"image's {cols} x {rows} pixels (width x height): it was drawn on another size of the image.",
        )
    return fill_polygon(ys, xs, out_shape)


def _metadata(json_path: Path) -> dict:
    try:
        stat = json_path.stat()
    except FileNotFoundError as e:
        raise DataError(json_path, "does not exist.") from e
    return _parse(json_path, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _parse(json_path: Path, mtime_ns: int) -> dict:
    try:
        content = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(json_path, f"cannot be read as JSON: {e}") from e
    metadata = content.get("_via_img_metadata", content) if isinstance(content, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, dict) and "filename" in v for v in metadata.values()):
        raise DataError(json_path, "is not a VIA / makesense.ai VGG JSON export (no per-image 'filename' entries).")
    return {entry["filename"]: entry for entry in metadata.values()}


def _regions(entry: dict) -> list:
    regions = entry.get("regions") or []
    return list(regions.values()) if isinstance(regions, dict) else list(regions)  # VIA 1 stores a dict


def via_filenames(json_path: str | os.PathLike) -> list[str]:
    """The file names of every image a VIA export lists, annotated or not."""
    return list(_metadata(Path(json_path)))


def via_items(json_path: str | os.PathLike, image_dir: str | os.PathLike | None = None) -> list[dict]:
    """The data-list items (paths) of a VIA 2 project or VIA/makesense.ai region export: each annotated image with
    its regions (``export.json::filename``). The images are in ``image_dir`` (default: the JSON's folder).

    A VIA project lists every image loaded into it, annotated or not: an image without regions is not annotated yet
    (an all-background label map would teach that it holds no retina), so it is left out and named in a log line."""
    json_path = Path(json_path)
    image_dir = Path(image_dir) if image_dir is not None else json_path.parent
    entries = _metadata(json_path)
    unannotated = [filename for filename, entry in entries.items() if not _regions(entry)]
    if unannotated:
        logger.warning(
            f"{json_path}: {len(unannotated)} of {len(entries)} images have no regions (not annotated), left out: "
            + ", ".join(unannotated[:5])
            + (" ..." if len(unannotated) > 5 else "")
        )
    items = []
    for filename, entry in entries.items():
        if not _regions(entry):
            continue
        image_path = image_dir / filename
        items.append(
            {
                "image": str(image_path),
                "label": member_path(json_path, filename),
                "id": image_path.stem,
                "source": str(image_path),
                "annotation_source": str(json_path),
            }
        )
    return items


class ViaLabelReader(ImageReader):
    """MONAI ``ImageReader`` rasterising one image's VIA regions (``export.json::filename``) to a ``(1, rows, cols)``
    uint8 label map.

    Args:
        class_names: class names, index = class value; a region's class attribute must match one (any case).
        attribute: the ``region_attributes`` key holding the class (default: the first non-empty string).
        max_pixels: the largest image whose label map is made (checked from the image's header).
    """

    def __init__(
        self, class_names: Sequence[str], attribute: str | None = None, max_pixels: PositiveInt | None = MAX_PIXELS
    ):
        super().__init__()
        self.class_names, self.attribute, self.max_pixels = list(class_names), attribute, max_pixels

    def verify_suffix(self, filename) -> bool:
        return all(str(split_member(f)[0]).lower().endswith(".json") for f in ensure_tuple(filename))

    def read(self, data, **kwargs):
        json_path, filename = split_member(ensure_tuple(data)[0])
        if filename is None:
            raise DataError(json_path, "names no image of the export (expected 'export.json::image.png').")
        entries = _metadata(json_path)
        if filename not in entries:
            raise DataError(json_path, f"has no entry for image {filename!r}.")
        shape = tuple(read_header(json_path.parent / filename, self.max_pixels)["shape"])
        label = np.zeros(shape, dtype=np.uint8)
        for region in _regions(entries[filename]):
            rows, cols = _rasterise(region.get("shape_attributes") or {}, shape, json_path, filename)
            label[rows, cols] = _region_class(region, self.class_names, self.attribute, json_path, filename)
        return member_path(json_path, filename), label

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        name, label = img
        meta = {
            MetaKeys.SPATIAL_SHAPE: np.asarray(label.shape),
            MetaKeys.ORIGINAL_CHANNEL_DIM: 0,
            MetaKeys.AFFINE: np.eye(3),
            MetaKeys.ORIGINAL_AFFINE: np.eye(3),
            "filename_or_obj": name,
            "label_kind": "indices",
        }
        return label[None], meta
