"""Synthetic OCT B-scan phantoms written in the Duke DME ``.mat`` layout.

The phantom is the project's embedded default data: it is generated, never downloaded, and it goes through the
same reader as the real Duke release. Each B-scan has a curved, tilted retina whose 8 boundaries are built from
the retinal pigment epithelium upwards with smoothly varying layer thicknesses; near the fovea the inner layers
thin out, so the foveal pit appears where it does in real scans. Layers get their typical reflectivity
(bright NFL, IPL, ISE and RPE; dark INL and ONL), then the image is blurred to the axial resolution, multiplied
by speckle and given vessel shadows. Everything is deterministic per seed.

Command line::

    python -m clinseg.datasets.oct.phantom --out data/phantoms/oct_layers --subjects 8
"""

from __future__ import annotations

import argparse
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from scipy.ndimage import gaussian_filter

from clinseg.datasets.io import atomic_write
from clinseg.datasets.oct.duke import DUKE_CLASS_NAMES


@dataclass(frozen=True)
class Layer:
    name: str
    thickness: float  # pixels at 256 rows, away from the fovea
    reflectivity: float  # mean intensity in [0, 1]
    foveal_thinning: float  # fraction of the thickness lost at the foveal centre (negative: thickens)


DUKE_LAYERS = (
    Layer("NFL", 9.0, 0.72, 0.95),
    Layer("GCL-IPL", 16.0, 0.50, 0.92),
    Layer("INL", 9.0, 0.24, 0.80),
    Layer("OPL", 7.0, 0.46, 0.55),
    Layer("ONL-ISM", 20.0, 0.16, -0.45),
    Layer("ISE", 4.0, 0.86, 0.0),
    Layer("OS-RPE", 9.0, 0.78, -0.15),
)
"""The 7 Duke layers, top to bottom (8 boundaries)."""

VITREOUS, CHOROID = 0.05, 0.36


def _smooth_profile(rng: np.random.Generator, x: np.ndarray, amplitude: float) -> np.ndarray:
    """1 + a smooth random wiggle, so thicknesses vary along the B-scan."""
    profile = np.ones_like(x)
    for frequency in (0.5, 1.3, 2.9):
        profile += amplitude / frequency * np.sin(2 * np.pi * frequency * x + rng.uniform(0, 2 * np.pi))
    return np.clip(profile, 0.4, None)


def synthesize_bscan(
    rng: np.random.Generator,
    height: int = 256,
    width: int = 384,
    layers: tuple[Layer, ...] = DUKE_LAYERS,
    fovea_strength: float = 1.0,
    vessel_shadows: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """One B-scan and its boundaries.

    Args:
        rng: the random generator (all randomness comes from it).
        height, width: rows (axial) and columns (A-scans).
        layers: layer definitions, top to bottom; ``len(layers) + 1`` boundaries are produced.
        fovea_strength: 0 (far from the fovea) to 1 (through the foveal centre).
        vessel_shadows: add the dark vertical shadows that retinal vessels cast on the outer layers.

    Returns:
        ``image`` (height, width) uint8 and ``boundaries`` (len(layers) + 1, width) float, 0-based rows.
    """
    scale = height / 256.0
    x = np.linspace(-1.0, 1.0, width)
    fovea_x = rng.uniform(-0.25, 0.25)
    fovea = fovea_strength * np.exp(-((x - fovea_x) ** 2) / (2 * rng.uniform(0.07, 0.12) ** 2))
    # the outer boundary (Bruch's membrane) is a smooth, tilted, curved line
    bottom = (
        height * rng.uniform(0.62, 0.74)
        + height * rng.uniform(0.04, 0.12) * x**2
        + height * rng.uniform(-0.06, 0.06) * x
    )
    thicknesses = [
        layer.thickness
        * scale
        * rng.uniform(0.85, 1.15)
        * _smooth_profile(rng, x, 0.08)
        * (1.0 - layer.foveal_thinning * fovea)
        for layer in layers
    ]
    boundaries = [bottom]
    for thickness in reversed(thicknesses):
        boundaries.append(boundaries[-1] - np.maximum(thickness, 0.3))
    boundaries = np.stack(boundaries[::-1])  # top (ILM) first

    rows = np.arange(height, dtype=np.float64)[:, None]
    image = np.full((height, width), VITREOUS)
    for index, layer in enumerate(layers):
        inside = (rows >= boundaries[index]) & (rows < boundaries[index + 1])
        image[inside] = layer.reflectivity * rng.uniform(0.9, 1.1)
    below = rows >= boundaries[-1]
    depth = np.clip(rows - boundaries[-1], 0, None)
    choroid = CHOROID * np.exp(-depth / (height * rng.uniform(0.12, 0.2)))
    choroid *= 1 + 0.35 * gaussian_filter(rng.standard_normal((height, width)), (2.0, 4.0)) * 3
    image = np.where(below, np.clip(choroid, 0, 1), image)

    if vessel_shadows:
        for _ in range(rng.integers(1, 4)):
            centre, half_width = rng.uniform(0, width), rng.uniform(2, 6) * width / 384
            shadow = np.exp(-((np.arange(width) - centre) ** 2) / (2 * half_width**2))
            under = rows > boundaries[1] + 2 * scale
            image = np.where(under, image * (1 - 0.55 * shadow[None]), image)

    image = gaussian_filter(image, sigma=(0.9 * scale, 0.6))  # finite axial and lateral resolution
    speckle = rng.gamma(shape=3.0, scale=1 / 3.0, size=image.shape)  # fully developed speckle, 3 looks
    image = image * speckle + rng.normal(0, 0.025, image.shape)
    image *= rng.uniform(0.75, 1.15)  # scan-to-scan brightness
    # signal falls off with depth in spectral-domain OCT
    image *= np.linspace(1.0, rng.uniform(0.6, 0.85), height)[:, None]
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), boundaries


def write_subject(
    path: str | os.PathLike,
    rng: np.random.Generator,
    n_bscans: int = 8,
    height: int = 256,
    width: int = 384,
    layers: tuple[Layer, ...] = DUKE_LAYERS,
    annotated_fraction: float = 0.75,
) -> Path:
    """Write one ``Subject_NN.mat`` in the Duke layout, annotated like the real release.

    As in Duke, some B-scans carry no annotation (all NaN) and the outermost columns of annotated B-scans are
    unannotated (NaN), so readers must handle both. ``manualLayers2`` is a second "grader" (grader 1 moved by up
    to a pixel).
    """
    path = Path(path)
    images = np.zeros((height, width, n_bscans), dtype=np.uint8)
    manual1 = np.full((len(layers) + 1, width, n_bscans), np.nan)
    centre = (n_bscans - 1) / 2
    annotated = rng.permutation(n_bscans)[: max(1, int(round(annotated_fraction * n_bscans)))]
    for index in range(n_bscans):
        fovea_strength = float(np.exp(-(((index - centre) / max(n_bscans / 4, 1)) ** 2)))
        image, boundaries = synthesize_bscan(rng, height, width, layers, fovea_strength)
        images[:, :, index] = image
        if index in annotated:
            left, right = rng.integers(0, width // 12, size=2)
            manual1[:, left : width - right, index] = boundaries[:, left : width - right] + 1.0  # 1-based rows
    manual2 = manual1 + rng.uniform(-1, 1, manual1.shape)
    content = {"images": images, "manualLayers1": manual1, "manualLayers2": manual2}
    # a half-written subject is never left under its real name
    return atomic_write(path, lambda tmp: tmp.write_bytes(mat_file_bytes(content)))


MAT_DESCRIPTION = b"MATLAB 5.0 MAT-file, a phantom of clinseg.datasets.oct.phantom"


def mat_file_bytes(content: dict) -> bytes:
    """``content`` as the bytes of a compressed MATLAB 5 file, the same bytes for the same content.

    scipy writes the time of writing into the file's 116-byte text header, so the same seed written a second later
    would be other bytes and another dataset fingerprint (which is how runs tell whether they saw the same data).
    The header's text is only a description: readers take the version and byte order from the bytes after it.
    """
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, content, do_compression=True)
    data = bytearray(buffer.getvalue())
    data[:116] = MAT_DESCRIPTION.ljust(116)
    return bytes(data)


def write_phantom_dataset(
    out_dir: str | os.PathLike,
    n_subjects: int = 8,
    n_bscans: int = 8,
    height: int = 256,
    width: int = 384,
    seed: int = 0,
) -> list[Path]:
    """Write ``Subject_01.mat`` ... ``Subject_NN.mat`` into ``out_dir`` (deterministic for a given seed)."""
    out_dir = Path(out_dir)
    paths = []
    for subject in range(1, n_subjects + 1):
        rng = np.random.default_rng([seed, subject])
        paths.append(write_subject(out_dir / f"Subject_{subject:02d}.mat", rng, n_bscans, height, width))
    return paths


def write_png_bscans(mat_path: str | os.PathLike, out_dir: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """Export the B-scans of a ``.mat`` file as 8-bit PNGs (how scanners' exports usually arrive)."""
    from PIL import Image

    images = scipy.io.loadmat(mat_path)["images"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(images.shape[2] if limit is None else min(limit, images.shape[2])):
        path = out_dir / f"{Path(mat_path).stem}_bscan{index:02d}.png"
        Image.fromarray(images[:, :, index]).save(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic OCT dataset in the Duke DME .mat layout.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--bscans", type=int, default=8, help="B-scans per subject")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_phantom_dataset(args.out, args.subjects, args.bscans, args.height, args.width, args.seed)
    print(f"wrote {len(paths)} subjects ({', '.join(DUKE_CLASS_NAMES[1:])}) to {args.out}")


if __name__ == "__main__":
    main()
