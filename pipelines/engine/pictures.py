"""What a person looks at: colour overlays, comparison panels, orthogonal views with captions, learning curves.

These build arrays and figures; the writers (:mod:`clinseg.pipelines.engine.writers`) put them on disk.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from clinseg.datasets.io import atomic_write

logger = logging.getLogger(__name__)


DEFAULT_PALETTE = (
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
)


def to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def to_label_map(x) -> np.ndarray:
    """A ``(C, *spatial)`` one-hot/probability map or ``(1, *spatial)``/``spatial`` label map to class indices.

    One-hot pixels that are all zero (unannotated) become -1.
    """
    array = to_numpy(x)
    if array.ndim >= 3 and array.shape[0] > 1:
        labels = array.argmax(axis=0)
        return np.where(array.sum(axis=0) > 0, labels, -1)
    if array.ndim >= 3:  # (1, spatial...)
        return array[0].astype(np.int64)
    return array.astype(np.int64)


def display_slices(image, prediction: np.ndarray, reference: np.ndarray | None):
    """Reduce a volume case to the axial slice (last axis) with the most reference (else predicted) foreground,
    so 3D results get the same ``image | prediction | reference`` panels as 2D ones. 2D input is returned as is."""
    if prediction.ndim < 3:
        return image, prediction, reference
    source = reference if reference is not None and (reference > 0).any() else prediction
    k = int(np.argmax((source > 0).reshape(-1, source.shape[-1]).sum(axis=0)))
    return to_numpy(image)[..., k], prediction[..., k], None if reference is None else reference[..., k]


def to_display(image) -> np.ndarray:
    """An image to uint8 for display: ``(1, H, W)``/``(H, W)`` to grey ``(H, W)``, ``(3, H, W)`` to RGB ``(H, W, 3)``,
    each stretched between its 1st and 99th percentiles."""
    array = to_numpy(image).astype(np.float32)
    if array.ndim == 3 and array.shape[0] == 3:
        array = np.moveaxis(array, 0, -1)
    elif array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    low, high = np.percentile(array, (1, 99)) if array.size else (0.0, 1.0)
    return (np.clip((array - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)


def to_rgb(image) -> np.ndarray:
    display = to_display(image)
    return display if display.ndim == 3 else np.repeat(display[..., None], 3, axis=-1)


def colorize(label_map: np.ndarray, palette: Sequence[Sequence[int]] = DEFAULT_PALETTE) -> np.ndarray:
    palette = np.asarray(palette, dtype=np.uint8)
    rgb = palette[np.clip(label_map, 0, None) % len(palette)]
    rgb[label_map < 0] = (128, 128, 128)  # unannotated
    return rgb


def overlay(image, label_map: np.ndarray, palette=DEFAULT_PALETTE, alpha: float = 0.45) -> np.ndarray:
    """Blend the classes (not background) over the image (grey or colour)."""
    base = to_rgb(image).astype(np.float32)
    colours = colorize(label_map, palette).astype(np.float32)
    blend = np.where((label_map > 0)[..., None], (1 - alpha) * base + alpha * colours, base)
    return blend.astype(np.uint8)


def comparison_panel(
    image, prediction: np.ndarray, reference: np.ndarray | None, palette=DEFAULT_PALETTE
) -> np.ndarray:
    """``image | prediction overlay | reference overlay`` side by side, with a 4-pixel white gap."""
    panels = [to_rgb(image), overlay(image, prediction, palette)]
    if reference is not None:
        panels.append(overlay(image, reference, palette))
    gap = np.full((panels[0].shape[0], 4, 3), 255, dtype=np.uint8)
    return np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)


def plot_learning_curves(history: Mapping[str, list[tuple[int, float]]], path: str | os.PathLike, title: str = ""):
    """Loss per iteration (raw and smoothed) and validation metrics per epoch, as one PNG. None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = {k: v for k, v in history.items() if "loss" in k.lower() and v}
    metrics = {k: v for k, v in history.items() if k.startswith("val_") and "/" not in k and v}
    if not losses and not metrics:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for key, points in losses.items():
        steps, values = zip(*sorted(points), strict=False)
        axes[0].plot(steps, values, alpha=0.35, label=f"{key} (per iteration)")
        window = max(1, len(values) // 20)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        axes[0].plot(steps[window - 1 :], smooth, label=f"{key} (moving mean of {window})")
    axes[0].set_xlabel("iteration")
    axes[0].set_title("training loss")
    axes[0].legend(fontsize=8)
    for key, points in metrics.items():
        steps, values = zip(*sorted(points), strict=False)
        finite = [(s, v) for s, v in zip(steps, values, strict=False) if math.isfinite(v)]
        if finite and max(v for _, v in finite) <= 1.0:
            axes[1].plot(*zip(*finite, strict=False), marker="o", label=key)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("validation metrics (0..1)")
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


def with_caption(
    panel: np.ndarray, lines: Sequence[str], legend: Sequence[tuple[str, Sequence[int]]] = ()
) -> np.ndarray:
    """The RGB ``panel`` with ``lines`` of text printed on a white strip below it (PIL's built-in font), so a
    picture says what it shows without its JSON beside it; ``legend``: (name, colour) pairs drawn as swatches."""
    import textwrap

    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    line_height = 14
    width = max(panel.shape[1], 160)
    lines = [part for line in lines for part in textwrap.wrap(line, max(20, width // 6))]
    rows: list[list] = []  # the legend's swatches, (x, name, colour), wrapped to the picture's width
    x = width
    for name, colour in legend:
        size = 16 + int(font.getlength(name))
        if x + size > width:
            rows.append([])
            x = 4
        rows[-1].append((x, name, tuple(int(c) for c in colour)))
        x += size + 8
    strip = Image.new("RGB", (width, 6 + line_height * (len(lines) + len(rows))), "white")
    draw = ImageDraw.Draw(strip)
    for index, line in enumerate(lines):
        draw.text((4, 3 + index * line_height), line, fill=(0, 0, 0), font=font)
    for row_index, row in enumerate(rows):
        y = 3 + (len(lines) + row_index) * line_height
        for x, name, colour in row:
            draw.rectangle((x, y + 2, x + 10, y + 12), fill=colour, outline=(0, 0, 0))
            draw.text((x + 14, y), name, fill=(0, 0, 0), font=font)
    if width > panel.shape[1]:  # a narrow picture: widened with white, so the caption stays readable
        panel = np.pad(panel, ((0, 0), (0, width - panel.shape[1]), (0, 0)), constant_values=255)
    return np.concatenate([panel, np.asarray(strip)], axis=0)


def class_legend(class_names: Sequence[str], palette=DEFAULT_PALETTE) -> list[tuple[str, Sequence[int]]]:
    """(name, colour) of each class but the background, as :func:`overlay` colours them."""
    palette = np.asarray(palette, dtype=np.uint8)
    return [(name, palette[index % len(palette)]) for index, name in enumerate(class_names) if index > 0]


def orthogonal_views(image, label_map: np.ndarray, palette=DEFAULT_PALETTE, affine: np.ndarray | None = None):
    """Axial, coronal and sagittal slices through the foreground's centre (or the volume's), overlaid, side by side.

    ``image`` and ``label_map`` are ``(X, Y, Z)`` volumes with voxel-to-RAS ``affine`` (identity if None). They are
    turned to RAS for display, scaled to square millimetres, and shown as radiology viewers do: anterior and
    superior up, the patient's right on the left of the picture.
    """
    import nibabel as nib
    from skimage.transform import resize

    volume = to_numpy(image).astype(np.float32).reshape(label_map.shape)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    to_ras = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine), [[0, 1], [1, 1], [2, 1]])
    volume = nib.orientations.apply_orientation(volume, to_ras)
    label_map = nib.orientations.apply_orientation(label_map, to_ras)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[to_ras[:, 0].astype(int).argsort()]
    centre = np.argwhere(label_map > 0).mean(axis=0) if (label_map > 0).any() else np.array(label_map.shape) / 2
    i, j, k = (int(c) for c in centre)
    views = [  # (plane, labels, pixel size along its two axes, mirror for the radiological convention)
        (volume[:, :, k], label_map[:, :, k], (spacing[0], spacing[1]), True),
        (volume[:, j, :], label_map[:, j, :], (spacing[0], spacing[2]), True),
        (volume[i, :, :], label_map[i, :, :], (spacing[1], spacing[2]), False),
    ]
    low, high = np.percentile(volume, (1, 99))
    panels = []
    pixels_per_mm = 256 / max(n * s for n, s in zip(label_map.shape, spacing, strict=True))  # one scale for all
    for plane, labels, (sx, sy), mirror in views:
        shown = np.clip((plane - low) / max(high - low, 1e-6), 0, 1)
        out_shape = (max(int(plane.shape[0] * sx * pixels_per_mm), 1), max(int(plane.shape[1] * sy * pixels_per_mm), 1))
        shown = resize(shown, out_shape, order=1, preserve_range=True)
        labels = resize(labels, out_shape, order=0, preserve_range=True, anti_aliasing=False).astype(np.int64)
        panel = np.rot90(overlay(shown, labels, palette))
        panels.append(np.ascontiguousarray(panel[:, ::-1] if mirror else panel))
    height = max(panel.shape[0] for panel in panels)
    panels = [np.pad(panel, ((0, height - panel.shape[0]), (0, 0), (0, 0))) for panel in panels]
    gap = np.full((height, 4, 3), 255, dtype=np.uint8)
    return np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
