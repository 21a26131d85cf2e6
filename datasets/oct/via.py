"""VGG Image Annotator (VIA) / makesense.ai "VGG JSON" polygon exports, rasterised to label maps.

This is how OCTID users and many small labs annotate: one JSON file with, per image, a list of regions whose
``shape_attributes`` are polygons (or rectangles) and whose ``region_attributes`` name the class.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from skimage.draw import polygon as fill_polygon

from clinseg.datasets.errors import DataError
from clinseg.datasets.oct.images import read_grayscale


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


def _rasterise(shape: dict, out_shape: tuple[int, int], json_path: Path, filename: str):
    name = shape.get("name")
    if name in ("polygon", "polyline"):
        xs, ys = shape.get("all_points_x"), shape.get("all_points_y")
        if not xs or not ys or len(xs) != len(ys) or len(xs) < 3:
            raise DataError(json_path, f"a polygon of {filename!r} has too few or unpaired points.")
        return fill_polygon(np.asarray(ys, float), np.asarray(xs, float), out_shape)
    if name == "rect":
        x, y, w, h = (float(shape[k]) for k in ("x", "y", "width", "height"))
        return fill_polygon(np.array([y, y, y + h, y + h]), np.array([x, x + w, x + w, x]), out_shape)
    raise DataError(json_path, f"region shape {name!r} of {filename!r} is not supported (polygon, polyline, rect).")


def read_via_json(
    json_path: str | os.PathLike,
    class_names: list[str],
    image_dir: str | os.PathLike | None = None,
    attribute: str | None = None,
) -> list[dict]:
    """Read a VIA 2 project or VIA/makesense.ai region export and rasterise its regions.

    Args:
        json_path: the export; either ``{"_via_img_metadata": {...}}`` (a VIA project) or the bare metadata dict.
        class_names: class names, index = class value; a region's class attribute must match one (any case).
        image_dir: where the images are (default: the JSON's folder).
        attribute: the ``region_attributes`` key holding the class (default: the first non-empty string).
    """
    json_path = Path(json_path)
    image_dir = Path(image_dir) if image_dir is not None else json_path.parent
    try:
        content = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(json_path, f"cannot be read as JSON: {e}") from e
    metadata = content.get("_via_img_metadata", content) if isinstance(content, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, dict) and "filename" in v for v in metadata.values()):
        raise DataError(json_path, "is not a VIA / makesense.ai VGG JSON export (no per-image 'filename' entries).")
    items = []
    for entry in metadata.values():
        filename = entry["filename"]
        image_path = image_dir / filename
        image = read_grayscale(image_path)
        label = np.zeros(image.shape[1:], dtype=np.uint8)
        regions = entry.get("regions") or []
        if isinstance(regions, dict):  # VIA 1 stores regions as a dict
            regions = list(regions.values())
        for region in regions:
            rows, cols = _rasterise(region.get("shape_attributes") or {}, label.shape, json_path, filename)
            label[rows, cols] = _region_class(region, class_names, attribute, json_path, filename)
        items.append(
            {
                "image": image,
                "label": label[None],
                "id": image_path.stem,
                "source": str(image_path),
                "label_source": str(json_path),
            }
        )
    return items
