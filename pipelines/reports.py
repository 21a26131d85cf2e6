"""What a person looks at: colour overlays, learning curves, and per-class metric summaries.

Every file is written to a temporary name and renamed, so an interrupted run never leaves a half-written
picture or JSON under the real name; the files of one case are renamed together, once all are written
(:func:`clinseg.datasets.io.atomic_write_all`), so a failed case leaves none of them. A write the environment refuses
(a full disk, no permission, a read-only folder, a file where a folder is expected) ends in a ``DataError`` naming
the file and the cause.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.config import KeysCollection
from monai.handlers import MetricsSaver
from monai.transforms import MapTransform
from PIL import Image

from clinseg.datasets.errors import DataError
from clinseg.datasets.io import RESERVED_RESULT_NAMES, atomic_write, atomic_write_all, nifti_writer, write_error
from clinseg.transforms.fundus import FOV_SOURCE_SUFFIX

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


def json_writer(content):
    """What writes ``content`` as JSON to the file it is given; the text is made now, so only the write can fail."""
    text = json.dumps(content, indent=2, default=_json_default)
    return lambda tmp: tmp.write_text(text)


def png_writer(array: np.ndarray):
    """What writes ``array`` as a PNG to the file it is given (encoded by then, so only the write can fail)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    data = buffer.getvalue()
    return lambda tmp: tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, content) -> Path:
    return atomic_write(path, json_writer(content))


def _json_default(value):
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    return str(value)


def save_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    return atomic_write(path, png_writer(array))


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


class EvaluationReport:
    """Evaluator handler: per-class metric summary (JSON), per-class metrics for the trackers, and overlays.

    At each evaluation epoch it averages ``engine.state.metric_details`` per class, adds them to
    ``engine.state.metrics`` as ``<metric>/<class>`` (so the MLflow and stats handlers listed after it record
    them), writes ``metrics.json`` and saves ``image | prediction | reference`` panels of the first images.

    Args:
        output_dir: where ``metrics.json`` and ``overlays/`` go.
        class_names: all class names, background first; details of metrics without background use ``[1:]``.
        num_overlays: how many images get a panel (-1: all).
        palette: class colours.
        key_metric: name of the key metric, whose best value and epoch are reported.
        pixel_size_um: micrometres per pixel along the measured axis, if known: ``*_px`` metrics are also given
            in micrometres (``*_um``).
        print_table: log a per-class table of every metric at the end of each epoch (evaluation runs).
        model: what was evaluated (:func:`clinseg.pipelines.runs.provenance`: the checkpoint, its SHA-256 and the
            training run), written into ``metrics.json``.
    """

    def __init__(
        self,
        output_dir: str,
        class_names: Sequence[str],
        num_overlays: int = 4,
        palette: Sequence[Sequence[int]] | None = None,
        key_metric: str | None = None,
        pixel_size_um: float | None = None,
        print_table: bool = False,
        model: Mapping | None = None,
        image_key: str = "image",
        pred_key: str = "pred",
        label_key: str = "label",
    ):
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.num_overlays = num_overlays
        self.palette = palette or DEFAULT_PALETTE
        self.key_metric = key_metric
        self.pixel_size_um = pixel_size_um
        self.print_table = print_table
        self.model = dict(model) if model else None
        self.keys = (image_key, pred_key, label_key)
        self.best: tuple[float, int] | None = None
        self._saved = 0
        self.anatomy: dict[str, dict] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def _reset(self, engine: Engine) -> None:
        self._saved = 0
        self.anatomy: dict[str, dict] = {}

    def _record_anatomy(self, outputs: list, batches: list) -> None:
        """The per-case anatomy verdicts (``clinseg.transforms.ct_anatomy``), when the post-processing made them."""
        for index, (output, batch) in enumerate(zip(outputs, batches, strict=False)):
            # MONAI's post-processing writes keys that came with the batch back into the batch
            found = [d.get("anatomy") for d in (output, batch) if isinstance(d, Mapping)]
            found = [text for text in found if isinstance(text, str)]
            if found:
                verdict = json.loads(found[0])
                name = str(batch.get("id", f"image{index:03d}")) if isinstance(batch, Mapping) else str(index)
                keep = ("field_of_view", "heart_expected", "flags", "outside_anatomy_ml", "volume_reportable")
                self.anatomy[name] = {key: verdict[key] for key in keep}

    def iteration_completed(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        batches = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch] * len(outputs)
        self._record_anatomy(outputs, batches)
        if 0 <= self.num_overlays <= self._saved:
            return
        image_key, pred_key, label_key = self.keys
        for output, batch in zip(outputs, batches, strict=False):
            if 0 <= self.num_overlays <= self._saved:
                break
            name = str(batch.get("id", f"image{self._saved:03d}")) if isinstance(batch, Mapping) else str(self._saved)
            reference = to_label_map(output[label_key]) if label_key in output else None
            image, prediction, reference = display_slices(output[image_key], to_label_map(output[pred_key]), reference)
            panel = comparison_panel(image, prediction, reference, self.palette)
            shown = "image | prediction of this model" + (" | reference" if reference is not None else "")
            caption = [f"{name}: {shown} (left to right)"]
            panel = with_caption(panel, caption, class_legend(self.class_names, self.palette))
            save_png(self.output_dir / "overlays" / f"{name}.png", panel)
            self._saved += 1

    def per_class(self, engine: Engine) -> dict[str, dict[str, float]]:
        summary = {}
        for metric, details in (getattr(engine.state, "metric_details", None) or {}).items():
            values = to_numpy(details).astype(np.float64)
            if values.ndim == 3 and values.shape[-1] == 4:  # confusion matrices [tp, fp, tn, fn] per image and class
                values = _confusion_metric(values.sum(axis=0, keepdims=True), metric)
                if values is None:
                    continue
            if values.ndim != 2 or values.shape[1] <= 1:
                continue
            names = self.class_names[-values.shape[1] :]  # metrics without background drop class 0
            with np.errstate(all="ignore"):
                means = np.nanmean(np.where(np.isinf(values), np.nan, values), axis=0)
            summary[metric] = {name: float(v) for name, v in zip(names, means, strict=False)}
            if self.pixel_size_um and metric.endswith("_px"):
                summary[metric[:-3] + "_um"] = {
                    name: float(v) * self.pixel_size_um for name, v in zip(names, means, strict=True)
                }
        return summary

    def epoch_completed(self, engine: Engine) -> None:
        per_class = self.per_class(engine)
        for metric, values in per_class.items():
            for name, value in values.items():
                engine.state.metrics[f"{metric}/{name}"] = value
        means = {k: float(v) for k, v in engine.state.metrics.items() if "/" not in k and np.isscalar(v)}
        if self.pixel_size_um:
            for key in [k for k in means if k.endswith("_px")]:
                means[key[:-3] + "_um"] = engine.state.metrics[key[:-3] + "_um"] = means[key] * self.pixel_size_um
        details = getattr(engine.state, "metric_details", None) or {}
        n_images = len(next(iter(details.values()))) if details else None
        report = {"mean": means, "per_class": per_class, "n_images": n_images}
        if self.anatomy:
            report["anatomy"] = self.anatomy
        if self.model:
            report["model"] = self.model
        if self.key_metric and self.key_metric in means:
            value = means[self.key_metric]
            epoch = engine.state.epoch  # an evaluator run by a trainer counts the trainer's epochs
            if self.best is None or value > self.best[0]:
                self.best = (value, epoch)
            report["best"] = {"metric": self.key_metric, "value": self.best[0], "epoch": self.best[1]}
        path = atomic_write_json(self.output_dir / "metrics.json", report)
        if self.print_table:
            logger.info(f"metrics of {n_images} images (written to {path}):\n{format_table(report)}")


class AtomicMetricsSaver(MetricsSaver):
    """MONAI's ``MetricsSaver`` (same arguments) whose tables are written into a hidden folder beside them, then
    renamed into ``save_dir`` together once all are written: a failed write leaves none of them (and the earlier
    tables intact), and a write the environment refuses is a ``DataError`` naming the table being written."""

    def __call__(self, engine: Engine) -> None:
        final_dir = Path(self.save_dir)
        staging = final_dir / f".tmp{os.getpid()}-{uuid.uuid4().hex[:8]}.tables"
        self.save_dir = str(staging)
        try:
            try:
                super().__call__(engine)
            except OSError as e:  # MONAI's plain open(): a full disk's error names no file
                written = sorted(staging.iterdir(), key=lambda p: p.stat().st_mtime_ns) if staging.is_dir() else []
                target = final_dir / written[-1].name if written else final_dir
                error = write_error(target, e, written[-1] if written else None)
                if error is None:
                    raise
                raise error from e
            tables = sorted(staging.iterdir()) if staging.is_dir() else []
            atomic_write_all([(final_dir / table.name, lambda tmp, t=table: os.replace(t, tmp)) for table in tables])
        finally:
            self.save_dir = str(final_dir)
            shutil.rmtree(staging, ignore_errors=True)


class EvaluationOutputs:
    """The files of an evaluation run: the per-class report with an overlay of every image
    (:class:`EvaluationReport`, rank 0) and MONAI's metric tables (:class:`AtomicMetricsSaver`: summaries and
    per-image ``*_raw.csv``, gathered across ranks, so attached on every rank)."""

    def __init__(
        self,
        output_dir: str,
        class_names: Sequence[str],
        palette: Sequence[Sequence[int]] | None = None,
        pixel_size_um: float | None = None,
        model: Mapping | None = None,
    ):
        from clinseg.pipelines.workflow import is_rank_zero

        self.report = None
        if is_rank_zero():
            self.report = EvaluationReport(
                output_dir, class_names, num_overlays=-1, palette=palette, pixel_size_um=pixel_size_um,
                print_table=True, model=model,
            )  # fmt: skip
        self.tables = AtomicMetricsSaver(
            save_dir=output_dir,
            metrics="*",
            metric_details="*",
            batch_transform=lambda batch: [{"filename_or_obj": item["id"]} for item in batch],
        )

    def attach(self, engine: Engine) -> None:
        if self.report is not None:
            self.report.attach(engine)
        self.tables.attach(engine)


def format_table(report: Mapping) -> str:
    """Metrics as a text table: one row per metric, its mean then one column per class."""
    per_class = report.get("per_class", {})
    classes = list(dict.fromkeys(name for values in per_class.values() for name in values))
    header = ["metric", "mean", *classes]
    rows = [header]
    for metric, mean in report.get("mean", {}).items():
        values = per_class.get(metric, {})
        rows.append([metric, f"{mean:.4f}", *(f"{values[c]:.4f}" if c in values else "" for c in classes)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=False)) for row in rows)


def _confusion_metric(matrix: np.ndarray, metric: str) -> np.ndarray | None:
    """Per-class precision / recall / specificity from pooled ``[tp, fp, tn, fn]`` counts, or None."""
    tp, fp, tn, fn = (matrix[..., i] for i in range(4))
    with np.errstate(all="ignore"):
        if "precision" in metric:
            return tp / (tp + fp)
        if "recall" in metric or "sensitivity" in metric:
            return tp / (tp + fn)
        if "specificity" in metric:
            return tn / (tn + fp)
    return None


class ResultLedger:
    """What a per-case results writer has written in this run, so that the run's summary counts the files that
    exist, not the inputs it was given, and no case overwrites another's results.

    A writer calls :meth:`claim` before writing a case (a second case of the same name, compared ignoring case, is
    refused before any of its files is written), writes the case's files with :meth:`write_case` (all or none: a
    write that fails leaves none of them, the earlier files under their names intact, and ends the run with a
    ``DataError`` naming the file) and calls :meth:`record` once they are in place, so a case whose write failed is
    never counted as written. :meth:`write_summary`, called once the run is over
    (``"$print(@results_writer.write_summary(@datalist, 'masks'))"`` in a config), writes
    ``<output_dir>/inference_summary.json`` and returns the one-line account to print; a run that fails before
    writes none (an earlier run's summary in the folder is left as it was).
    """

    output_dir: Path

    def _ledger(self) -> dict[str, dict]:
        if not hasattr(self, "_written"):
            self._written: dict[str, dict] = {}
        return self._written

    def claim(self, name: str, source: str) -> None:
        earlier = self._ledger().get(name.casefold())
        if earlier is not None and earlier["source"] != source:
            raise DataError(
                source,
                f"its results would overwrite those of {earlier['source']} in {self.output_dir} (both are named "
                f"{name!r}).",
                "Give the inputs distinct names; data lists built with clinseg.datasets.io.unique_ids never collide.",
            )

    def write_case(self, files: Mapping[str, Callable[[Path], object]]) -> list[Path]:
        """Write a case's files (names in :attr:`output_dir`, each with its writer) together: all or none."""
        return atomic_write_all([(self.output_dir / name, write) for name, write in files.items()])

    def record(self, case: dict) -> None:
        self._ledger()[str(case["id"]).casefold()] = case

    @property
    def written(self) -> list[dict]:
        return list(self._ledger().values())

    def write_summary(
        self, datalist: Sequence[Mapping] | None = None, what: str = "results", model: Mapping | None = None
    ) -> str:
        """Write ``inference_summary.json`` (the cases written, those renamed or not written, and ``model``: what
        inferred them, :func:`clinseg.pipelines.runs.provenance`) and return the line to print."""
        cases = self.written
        renamed = [case for case in cases if case.get("original_id", case["id"]) != case["id"]]
        assumed = [case for case in cases if case.get("geometry_assumed")]
        written_ids = {str(case["id"]) for case in cases}
        missing = [item for item in datalist or [] if str(item.get("id")) not in written_ids]
        summary = {
            "n_inputs": len(datalist) if datalist is not None else len(cases),
            "n_written": len(cases),
            "cases": cases,
            "renamed": [{"source": c["source"], "original_id": c["original_id"], "id": c["id"]} for c in renamed],
            "geometry_assumed": [
                {"id": c["id"], "source": c["source"], "geometry": c["geometry_assumed"]} for c in assumed
            ],
            "not_written": [str(item.get("source", item.get("image", item.get("id")))) for item in missing],
        }
        if model:
            summary["model"] = dict(model)
        path = atomic_write_json(self.output_dir / f"{RESERVED_RESULT_NAMES[0]}.json", summary)
        message = (
            f"wrote {len(cases)} of {summary['n_inputs']} {what} to {self.output_dir.resolve()} (list: {path.name})"
        )
        if renamed:
            message += "; renamed to keep results apart: " + ", ".join(
                f"{Path(c['source']).name} -> {c['id']}" for c in renamed
            )
        if assumed:
            message += f"; geometry ASSUMED for {len(assumed)} (see 'geometry_assumed' in their JSON)"
        if missing:
            message += f"; NOT written: {', '.join(summary['not_written'])}"
        return message


class SaveSegmentationd(MapTransform, ResultLedger):
    """Write, per image, the label map (index PNG), a colour overlay PNG and a JSON summary.

    Use after the prediction is inverted to the input's grid and turned into a ``(1, H, W)`` label map. Outputs
    are ``<output_dir>/<id>_seg.png``, ``<id>_overlay.png``, ``<id>.json``, and ``<id>_prob.png`` (foreground
    probability, 0-255) when ``prob_key`` names a ``(2, H, W)`` probability map.

    The summary gives each class's area fraction (inside the field of view when ``fov_key`` is given; the
    prediction outside it is set to background) and, with ``thickness=True`` (layered tissue such as the retina in
    OCT), each class's mean thickness per column in pixels, and in micrometres when ``pixel_size_um`` is given.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str,
        class_names: Sequence[str],
        image_key: str = "image",
        id_key: str = "id",
        prob_key: str | None = None,
        fov_key: str | None = None,
        palette: Sequence[Sequence[int]] | None = None,
        thickness: bool = False,
        pixel_size_um: float | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.image_key, self.id_key, self.prob_key, self.fov_key = image_key, id_key, prob_key, fov_key
        self.palette = palette or DEFAULT_PALETTE
        self.thickness = thickness
        self.pixel_size_um = pixel_size_um

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label_map = to_label_map(d[key])
            inside = np.ones(label_map.shape, bool)
            if self.fov_key and self.fov_key in d:
                inside = to_numpy(d[self.fov_key]).reshape(label_map.shape) > 0
                label_map = np.where(inside, label_map, 0)
            name = str(d.get(self.id_key, "image"))
            source = str(d.get("source", d.get("image_path", name)))
            self.claim(name, source)
            files = {
                f"{name}_seg.png": png_writer(label_map.astype(np.uint8)),
                f"{name}_overlay.png": png_writer(overlay(d[self.image_key], label_map, self.palette)),
            }
            if self.prob_key and self.prob_key in d:
                probability = to_numpy(d[self.prob_key])[-1] * inside
                files[f"{name}_prob.png"] = png_writer((np.clip(probability, 0, 1) * 255).astype(np.uint8))
            field = "whole image"
            if self.fov_key and self.fov_key in d:
                field = str(d.get(self.fov_key + FOV_SOURCE_SUFFIX) or "given")
                if field == "estimated":  # what the results were confined to, for a person to check
                    files[f"{name}_fov.png"] = png_writer(inside.astype(np.uint8) * 255)
            n_inside = max(int(inside.sum()), 1)
            summary = {
                "id": name,
                **_renaming(d, name),
                "shape": list(label_map.shape),
                **({"field_of_view": field} if self.fov_key else {}),
                **_fov_scale(d),
                "classes_present": [
                    self.class_names[i] for i in np.unique(label_map) if 0 <= i < len(self.class_names)
                ],
                "area_fraction": {
                    cls: float(((label_map == index) & inside).sum() / n_inside)
                    for index, cls in enumerate(self.class_names)
                },
            }
            if self.thickness:
                thickness = {
                    cls: float((label_map == index).sum(axis=0).mean())
                    for index, cls in enumerate(self.class_names)
                    if index
                }
                summary["mean_thickness_px"] = thickness
                if self.pixel_size_um:
                    summary["mean_thickness_um"] = {k: v * self.pixel_size_um for k, v in thickness.items()}
            files[f"{name}.json"] = json_writer(summary)
            self.write_case(files)
            self.record(
                {"id": name, "source": source, "original_id": summary.get("original_id", name), "files": list(files)}
            )
        return d


def _fov_scale(d: Mapping) -> dict:
    """``resampled_by``: the factor the photograph was resampled by for the network (``ScaleToFOVd``), when not 1."""
    for value in d.values():
        factor = getattr(value, "meta", {}).get("fov_scale") if isinstance(value, torch.Tensor) else None
        if factor is not None:
            return {"resampled_by": round(float(factor), 4)} if float(factor) != 1.0 else {}
    return {}


def _renaming(d: Mapping, name: str) -> dict:
    """``original_id`` and why, for a case renamed to keep its results apart from another input's."""
    original = str(d.get("original_id") or name)
    if original == name:
        return {}
    return {"original_id": original, "renamed": f"another input also has the name {original!r}"}


def _geometry_assumed(*tensors) -> str:
    """The ``geometry_assumed`` note of the first of ``tensors`` whose metadata has one, else ''."""
    for tensor in tensors:
        note = getattr(tensor, "meta", {}).get("geometry_assumed") if tensor is not None else None
        if isinstance(note, (list, tuple)):  # collated
            note = note[0] if note else ""
        if note:
            return str(note)
    return ""


def with_caption(
    panel: np.ndarray, lines: Sequence[str], legend: Sequence[tuple[str, Sequence[int]]] = ()
) -> np.ndarray:
    """The RGB ``panel`` with ``lines`` of text printed on a white strip below it (PIL's built-in font), so a
    picture says what it shows without its JSON beside it; ``legend``: (name, colour) pairs drawn as swatches."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

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


class SaveVolumeSegmentationd(MapTransform, ResultLedger):
    """Write, per volume, the label map as NIfTI on the input's grid, a JSON summary and an overlay picture.

    Use after ``Invertd`` has brought the ``(1, X, Y, Z)`` label map back to the input's grid: the NIfTI gets the
    input's shape and affine (for a DICOM series, its patient space in RAS). The JSON gives each class's voxel
    count and volume in millilitres, the spacing, shape and source; ``<id>_views.png`` shows axial, coronal and
    sagittal slices through the structure. Files are written atomically: a failed case leaves none of its files.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str,
        class_names: Sequence[str],
        image_key: str = "image",
        id_key: str = "id",
        palette: Sequence[Sequence[int]] | None = None,
        postfix: str = "seg",
        anatomy_key: str = "anatomy",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.image_key, self.id_key = image_key, id_key
        self.palette = palette or DEFAULT_PALETTE
        self.postfix = postfix
        self.anatomy_key = anatomy_key

    def caption(self, summary: Mapping) -> list[str]:
        """What the views show: the case, the prediction's colour, each class's volume (or why it is withheld) and
        the anatomy verdict."""
        shown = "; ".join(
            f"{cls}: {ml:.0f} mL" if ml is not None else f"{cls}: volume withheld"
            for cls, ml in summary["volume_ml"].items()
        )
        lines = [f"{summary['id']}: axial, coronal, sagittal through the prediction (coloured); {shown}"]
        if "field_of_view" in summary:
            flags = ", ".join(summary.get("anatomy_flags", [])) or "none"
            lines.append(
                f"field of view {summary['field_of_view']}, heart expected {summary['heart_expected']}; flags: {flags}"
            )
        return lines

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        from clinseg.pipelines.metrics import volume_ml

        d = dict(data)
        for key in self.key_iterator(d):
            prediction = d[key]
            label_map = to_label_map(prediction).astype(np.uint8)
            affine = to_numpy(prediction.affine).astype(np.float64)
            spacing = np.linalg.norm(affine[:3, :3], axis=0)
            name = str(d.get(self.id_key, "volume"))
            source = prediction.meta.get("filename_or_obj", "") if hasattr(prediction, "meta") else ""
            source = str(d.get("source") or source)
            self.claim(name, source)
            assumed = _geometry_assumed(prediction, d.get(self.image_key))
            summary = {
                "id": name,
                **_renaming(d, name),
                "source": source,
                "shape": list(label_map.shape),
                "spacing_mm": [round(float(s), 4) for s in spacing],
                "affine": affine.round(6).tolist(),
                "voxels": {cls: int((label_map == i).sum()) for i, cls in enumerate(self.class_names) if i},
                "volume_ml": {
                    cls: round(volume_ml(label_map == i, spacing), 3) for i, cls in enumerate(self.class_names) if i
                },
            }
            if assumed:  # the volumes below rest on a spacing the user gave, not on the file's own geometry
                summary["geometry_assumed"] = assumed
            if self.anatomy_key in d:  # the field-of-view verdict (clinseg.transforms.ct_anatomy)
                anatomy = json.loads(d[self.anatomy_key])
                summary.update(
                    field_of_view=anatomy["field_of_view"],
                    heart_expected=anatomy["heart_expected"],
                    anatomy_flags=anatomy["flags"],
                    anatomy=anatomy,
                )
                if not anatomy["volume_reportable"]:
                    # the mask's content stays available, under a name that does not read as the organ's volume
                    summary["segmented_volume_ml"] = summary["volume_ml"]
                    summary["volume_ml"] = {cls: None for cls in summary["volume_ml"]}
                    summary["volume_withheld"] = "; ".join(anatomy["reasons"])
            views = with_caption(
                orthogonal_views(d[self.image_key], label_map, self.palette, affine), self.caption(summary)
            )
            files = {
                f"{name}_{self.postfix}.nii.gz": nifti_writer(label_map, affine),
                f"{name}_views.png": png_writer(views),
                f"{name}.json": json_writer(summary),
            }
            self.write_case(files)
            self.record(
                {
                    "id": name,
                    "source": source,
                    "original_id": summary.get("original_id", name),
                    **({"geometry_assumed": assumed} if assumed else {}),
                    **{key: summary[key] for key in ("field_of_view", "heart_expected", "volume_ml") if key in summary},
                    "files": list(files),
                }
            )
            logger.info(
                f"{name}: "
                + ", ".join(
                    f"{cls} {ml:.1f} mL" if ml is not None else f"{cls}: volume withheld ({summary['volume_withheld']})"
                    for cls, ml in summary["volume_ml"].items()
                )
                + f" -> {self.output_dir / f'{name}_{self.postfix}.nii.gz'}"
            )
        return d
