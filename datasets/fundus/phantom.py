"""Synthetic colour fundus photographs with their vessel annotation, written in the DRIVE release layout.

The phantom is the embedded default data of the vessels bundle and its test data. Each image has a circular field
of view with illumination fall-off, an orange-red background with low-frequency choroidal texture, a bright optic
disc, a darker macula, and a branching vessel tree grown from the disc: four arcades that curve around the
macula, branch, and taper (children follow Murray's law). Vessels are darkest in the green channel, as in real
photographs. The annotation is the drawn tree; the FOV mask is the circle. Deterministic per seed.

    python -m clinseg.datasets.fundus.phantom --out data/phantoms/vessels --images 12
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from clinseg.datasets.io import atomic_write

DRIVE_SHAPE = (584, 565)  # rows, columns of a DRIVE photograph


def _grow_branch(
    draw_label: ImageDraw.ImageDraw,
    draw_width: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    start: np.ndarray,
    angle: float,
    width: float,
    bend: float,
    scale: float,
    depth: int,
) -> None:
    """Grow one vessel as a smooth random walk; it branches, tapers, and ends when it gets too thin."""
    point = start.astype(float)
    step = 6.0 * scale
    length = 0.0
    max_length = rng.uniform(150, 300) * scale * (1.0 + 0.4 * width / 8)
    next_branch = rng.uniform(25, 60) * scale
    while width >= 0.8 and length < max_length:
        angle += bend * step / (220 * scale) + rng.normal(0, 0.06)
        new_point = point + step * np.array([np.sin(angle), np.cos(angle)])  # (row, col)
        w = max(1, int(round(width)))
        segment = [tuple(point[::-1]), tuple(new_point[::-1])]  # PIL wants (x, y)
        draw_label.line(segment, fill=255, width=w)
        draw_width.line(segment, fill=int(min(width, 12) * 20), width=w)
        point, length = new_point, length + step
        width *= 1.0 - rng.uniform(0.001, 0.004) * step / scale
        if length > next_branch and depth < 7:
            # Murray's law: d_parent^3 = d_a^3 + d_b^3; the side branch takes the smaller share
            share = rng.uniform(0.25, 0.45)
            child = width * share ** (1 / 3)
            width = width * (1 - share) ** (1 / 3)
            side = rng.choice([-1.0, 1.0])
            _grow_branch(
                draw_label,
                draw_width,
                rng,
                point,
                angle + side * rng.uniform(0.5, 1.1),
                child,
                -side * abs(bend) * 0.5 + rng.normal(0, 0.3),
                scale,
                depth + 1,
            )
            next_branch = length + rng.uniform(25, 60) * scale


def synthesize_fundus(
    rng: np.random.Generator, shape: tuple[int, int] = DRIVE_SHAPE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One photograph ``(H, W, 3)`` uint8, its vessel mask ``(H, W)`` bool and FOV mask ``(H, W)`` bool."""
    height, width = shape
    scale = min(height, width) / 565.0
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    centre = np.array([height / 2, width / 2]) + rng.normal(0, 4 * scale, 2)
    radius = 0.47 * min(height, width)
    distance = np.hypot(rows - centre[0], cols - centre[1]) / radius
    fov = distance <= 1.0

    # optic disc on one side, macula on the other, at the height of the centre
    side = rng.choice([-1.0, 1.0])
    disc = centre + np.array([rng.normal(0, 0.05), side * rng.uniform(0.5, 0.62)]) * radius
    macula = centre + np.array([rng.normal(0, 0.04), -side * rng.uniform(0.05, 0.15)]) * radius
    disc_radius = rng.uniform(0.13, 0.16) * radius

    label_image = Image.new("L", (width, height), 0)
    width_image = Image.new("L", (width, height), 0)
    draw_label, draw_width = ImageDraw.Draw(label_image), ImageDraw.Draw(width_image)
    toward_macula = np.arctan2(macula[0] - disc[0], macula[1] - disc[1])
    for vertical in (-1.0, 1.0):
        # temporal arcades arch around the macula; nasal vessels run away from it
        for base, bend, calibre in (
            (toward_macula, 1.0, 8.0),
            (toward_macula, 0.4, 4.0),
            (toward_macula + np.pi, -0.6, 6.5),
            (toward_macula + np.pi / 2 * vertical, 0.2, 4.5),
        ):
            angle = base + vertical * rng.uniform(0.9, 1.25)
            start = disc + 0.3 * disc_radius * np.array([np.sin(angle), np.cos(angle)])
            _grow_branch(
                draw_label,
                draw_width,
                rng,
                start,
                angle,
                calibre * scale * rng.uniform(0.85, 1.1),
                -vertical * bend * rng.uniform(0.7, 1.0) * (1 if base == toward_macula else -1),
                scale,
                0,
            )
    vessels = (np.asarray(label_image) > 0) & fov
    calibre = np.asarray(width_image, dtype=np.float64) / 20.0

    texture = gaussian_filter(rng.standard_normal((height, width)), 12 * scale) * 6
    illumination = np.clip(1.0 - 0.55 * distance**2.2, 0.15, 1.0) * rng.uniform(0.8, 1.1)
    base_colour = np.array([rng.uniform(170, 215), rng.uniform(70, 100), rng.uniform(25, 45)])
    image = base_colour[None, None] * illumination[..., None] * (1 + 0.06 * texture[..., None])
    disc_profile = np.exp(-((np.hypot(rows - disc[0], cols - disc[1]) / disc_radius) ** 4))
    image += disc_profile[..., None] * np.array([50.0, 90.0, 60.0])
    macula_profile = np.exp(-((np.hypot(rows - macula[0], cols - macula[1]) / (0.18 * radius)) ** 2))
    image *= 1.0 - 0.35 * macula_profile[..., None]

    contrast = np.where(vessels, 0.22 + 0.3 * np.clip(calibre / 8, 0, 1), 0.0)
    contrast = gaussian_filter(contrast, 0.7 * scale + 0.3)
    image *= 1.0 - contrast[..., None] * np.array([0.35, 1.0, 0.6])  # vessels absorb green most
    image = gaussian_filter(image, (0.6, 0.6, 0)) + rng.normal(0, 3.0, image.shape)
    image[~fov] = rng.uniform(0, 4, size=(int((~fov).sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8), vessels, fov


def write_drive_layout(
    out_dir: str | os.PathLike,
    n_images: int = 12,
    shape: tuple[int, int] = DRIVE_SHAPE,
    seed: int = 0,
    split: str = "training",
    first_id: int = 21,
) -> list[Path]:
    """Write ``<split>/images/NN_<split>.tif``, ``1st_manual/NN_manual1.gif`` and ``mask/NN_<split>_mask.gif``."""
    root = Path(out_dir) / split
    for folder in ("images", "1st_manual", "mask"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(first_id, first_id + n_images):
        image, vessels, fov = synthesize_fundus(np.random.default_rng([seed, index]), shape)
        path = root / "images" / f"{index:02d}_{split}.tif"
        for target, array, fmt in (
            (root / "1st_manual" / f"{index:02d}_manual1.gif", vessels.astype(np.uint8) * 255, "GIF"),
            (root / "mask" / f"{index:02d}_{split}_mask.gif", fov.astype(np.uint8) * 255, "GIF"),
            (path, image, "TIFF"),  # the image last: a folder with an image has all its files
        ):
            atomic_write(target, lambda tmp, array=array, fmt=fmt: Image.fromarray(array).save(tmp, format=fmt))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write synthetic fundus photographs in the DRIVE layout.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--height", type=int, default=DRIVE_SHAPE[0])
    parser.add_argument("--width", type=int, default=DRIVE_SHAPE[1])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_drive_layout(args.out, args.images, (args.height, args.width), args.seed)
    print(f"wrote {len(paths)} fundus phantoms to {Path(args.out) / 'training'}")


if __name__ == "__main__":
    main()
