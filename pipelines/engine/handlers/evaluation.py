"""Evaluator handlers: the per-class metric report (JSON, a text table, overlays) and MONAI's metric tables, both
written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from ignite.engine import Engine, Events
from monai.handlers import MetricsSaver

from clinseg.datasets.io import atomic_write_all, write_error
from clinseg.datasets.value_types import PositiveFloat
from clinseg.pipelines.engine.pictures import (
    DEFAULT_PALETTE,
    class_legend,
    comparison_panel,
    display_slices,
    to_label_map,
    to_numpy,
    with_caption,
)
from clinseg.pipelines.engine.writers import atomic_write_json, save_png

logger = logging.getLogger(__name__)


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
        every_rank: attached on every rank of a distributed evaluation: each rank draws the overlays of its own
            cases, the per-case anatomy verdicts are gathered, and rank 0 alone writes ``metrics.json``.
    """

    def __init__(
        self,
        output_dir: str,
        class_names: Sequence[str],
        num_overlays: int = 4,
        palette: Sequence[Sequence[int]] | None = None,
        key_metric: str | None = None,
        pixel_size_um: PositiveFloat | None = None,
        print_table: bool = False,
        model: Mapping | None = None,
        image_key: str = "image",
        pred_key: str = "pred",
        label_key: str = "label",
        every_rank: bool = False,
    ):
        self.every_rank = every_rank
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
                # per image, then averaged, as the headline mean is; a pooled metric (the bundles name them
                # "global" or "pooled") pools the images' counts, as its headline value does
                pooled = "pooled" in metric or "global" in metric
                values = _confusion_metric(values.sum(axis=0, keepdims=True) if pooled else values, metric)
                if values is None:
                    continue
            if values.ndim != 2 or values.shape[1] <= 1:
                continue
            names = class_columns(self.class_names, values.shape[1])
            if names is None:
                logger.warning(
                    f"{metric}: {values.shape[1]} values per image for the {len(self.class_names)} classes "
                    f"{self.class_names}: not reported per class"
                )
                continue
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
        if self.every_rank:
            from clinseg.pipelines.context import from_every_rank, is_rank_zero

            shares = from_every_rank(self.anatomy)  # each rank's verdicts on its own cases
            self.anatomy = dict(sorted((name, entry) for share in shares for name, entry in share.items()))
            if not is_rank_zero():  # one metrics.json, of every rank's cases
                return
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
            # an undefined value (NaN: no reference structure in any image) is never better than a number, and
            # one in the first epoch must not stand as the best against every later value (NaN compares False)
            if self.best is None or value > self.best[0] or (np.isnan(self.best[0]) and not np.isnan(value)):
                self.best = (value, epoch)
            report["best"] = {"metric": self.key_metric, "value": self.best[0], "epoch": self.best[1]}
        path = atomic_write_json(self.output_dir / "metrics.json", report)
        if self.print_table:
            logger.info(f"metrics of {n_images} images (written to {path}):\n{format_table(report)}")


class AtomicMetricsSaver(MetricsSaver):
    """MONAI's ``MetricsSaver`` (same arguments) whose tables are written into a hidden folder beside them, then
    renamed into ``save_dir`` together once all are written: a failed write leaves none of them (and the earlier
    tables intact), and a write the environment refuses is a ``DataError`` naming the table being written."""

    def __init__(self, *args, class_names: Sequence[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.class_names = list(class_names) if class_names else None

    def __call__(self, engine: Engine) -> None:
        final_dir = Path(self.save_dir)
        staging = final_dir / f".tmp{os.getpid()}-{uuid.uuid4().hex[:8]}.tables"
        self.save_dir = str(staging)
        details = getattr(engine.state, "metric_details", None)
        if details:  # a confusion metric's details are MONAI's [tp, fp, tn, fn] counts: the tables show the metric
            engine.state.metric_details = {name: _per_image(name, value) for name, value in details.items()}
        names = self._filenames
        # MONAI writes each image's name into its row as it is: a name with the delimiter in it ("scan 1, OD")
        # would shift that row's values into the wrong columns, so names are quoted as CSV quotes a field
        self._filenames = [_csv_field(str(name), self.deli) for name in names]
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
            for table in tables:
                self._name_classes(table)
            atomic_write_all([(final_dir / table.name, lambda tmp, t=table: os.replace(t, tmp)) for table in tables])
        finally:
            self.save_dir = str(final_dir)
            self._filenames = names
            if details:
                engine.state.metric_details = details
            shutil.rmtree(staging, ignore_errors=True)

    def _name_classes(self, table: Path) -> None:
        """MONAI heads a per-image table's columns ``class0``, ``class1``...: the classes' names instead (the
        metrics leave the background out, so ``class0`` is the first foreground class)."""
        if not self.class_names or not table.name.endswith("_raw.csv"):
            return
        lines = table.read_text().split("\n")
        header = lines[0].split(self.deli)
        columns = [c for c in header if re.fullmatch(r"class\d+", c)]
        names = class_columns(self.class_names, len(columns)) if columns else None
        if names is None and len(columns) == 1:
            names = [ALL_CLASSES]  # one value per image over every class (pixel accuracy), no class's own
        if names is not None:
            renamed = {column: name for column, name in zip(columns, names, strict=True)}
            lines[0] = self.deli.join(renamed.get(c, c) for c in header)
            table.write_text("\n".join(lines))


ALL_CLASSES = "all_classes"
"""The column name of a per-image value that belongs to no one class (pixel accuracy of a multi-class task)."""


def class_columns(class_names: Sequence[str], count: int) -> list[str] | None:
    """The classes that ``count`` per-class values of a metric stand for: every class, or the foreground classes
    (metrics without background drop class 0); None for any other count, which names no class for certain (one
    value over all classes of a multi-class task, or a metric of another set of classes)."""
    names = list(class_names)
    if count == len(names):
        return names
    if count == len(names) - 1:
        return names[1:]
    return None


def _csv_field(text: str, delimiter: str) -> str:
    """``text`` as one field of a CSV row: quoted (quotes doubled) only where it holds the delimiter, a quote or a
    line break, as the ``csv`` module writes it."""
    buffer = io.StringIO()
    csv.writer(buffer, delimiter=delimiter, lineterminator="").writerow([text])
    return buffer.getvalue()


def _per_image(name: str, values):
    """Per-image, per-class values of a metric's details: confusion counts turned into the metric's ratio."""
    array = to_numpy(values).astype(np.float64)
    if array.ndim == 3 and array.shape[-1] == 4:
        converted = _confusion_metric(array, name)
        return converted if converted is not None else array
    return values


class EvaluationOutputs:
    """The files of an evaluation run: the per-class report with an overlay of every image
    (:class:`EvaluationReport`: rank 0 writes the report, each rank the overlays of its own images) and MONAI's
    metric tables (:class:`AtomicMetricsSaver`: summaries and per-image ``*_raw.csv``, gathered across ranks).
    Attached on every rank."""

    def __init__(
        self,
        output_dir: str,
        class_names: Sequence[str],
        palette: Sequence[Sequence[int]] | None = None,
        pixel_size_um: PositiveFloat | None = None,
        model: Mapping | None = None,
    ):
        from clinseg.pipelines.context import is_rank_zero

        # on every rank of a distributed evaluation: each rank draws its own cases' overlays, rank 0 writes the report
        self.report = EvaluationReport(
            output_dir, class_names, num_overlays=-1, palette=palette, pixel_size_um=pixel_size_um,
            print_table=is_rank_zero(), model=model, every_rank=True,
        )  # fmt: skip
        self.tables = AtomicMetricsSaver(
            class_names=class_names,
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
    """Per-class values of the confusion-matrix metric that ``metric``'s last words name (``val_accuracy``,
    ``val_global_f1``, ``eval_precision``: MONAI's names and aliases) from ``[tp, fp, tn, fn]`` counts, by MONAI's
    own formulas (NaN where a ratio is 0/0, as MONAI's per-image values are); None for a name MONAI does not know.
    Every metric a bundle may compute from counts is converted: a table never shows the raw counts as values."""
    import torch
    from monai.metrics.confusion_matrix import check_confusion_matrix_metric_name, compute_confusion_matrix_metric

    words = metric.lower().split("/")[0].split("_")
    for start in range(len(words)):
        name = "_".join(words[start:])
        try:
            check_confusion_matrix_metric_name(name)
        except NotImplementedError:
            continue
        return compute_confusion_matrix_metric(name, torch.as_tensor(matrix, dtype=torch.float64)).numpy()
    return None
