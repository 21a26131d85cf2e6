"""Writers of results: the segmentation files and the per-case JSON of inference, and the ledger of what a run
wrote.

Every file is written to a temporary name and renamed, so an interrupted run never leaves a half-written
picture or JSON under the real name; the files of one case are renamed together, once all are written
(:func:`clinseg.datasets.io.atomic_write_all`), so a failed case leaves none of them. A write the environment refuses
(a full disk, no permission, a read-only folder, a file where a folder is expected) ends in a ``DataError`` naming
the file and the cause.

A run's results never mix with another run's: a writer makes its output folder its own before its first case (a
lock held until the process ends, so a second run started into the same folder at once is refused) and refuses a
folder that already holds results of an earlier run, unless asked to write over them (``overwrite``).
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import logging
import math
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from PIL import Image

from clinseg.datasets.ct.volumes import voxel_volume_ml
from clinseg.datasets.errors import DataError
from clinseg.datasets.io import RESERVED_RESULT_NAMES, atomic_write, atomic_write_all, nifti_writer
from clinseg.datasets.refusals import refusal_error
from clinseg.datasets.value_types import PositiveFloat
from clinseg.pipelines.engine.pictures import (
    DEFAULT_PALETTE,
    orthogonal_views,
    overlay,
    to_label_map,
    to_numpy,
    with_caption,
)
from clinseg.pipelines.paths import earlier_results
from clinseg.transforms.fundus import FOV_SOURCE_SUFFIX

logger = logging.getLogger(__name__)


def _finite_or_null(value):
    """``value`` with every NaN or infinite float made None: JSON has no NaN (Python would write a bare ``NaN`` that
    other readers refuse), and an undefined metric is null, not a number."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    if isinstance(value, (np.floating, torch.Tensor)) and np.size(value) == 1:
        return _finite_or_null(float(value))
    return value


def json_writer(content):
    """What writes ``content`` as JSON to the file it is given; the text is made now, so only the write can fail."""
    text = json.dumps(_finite_or_null(content), indent=2, default=_json_default)
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


class ResultLedger:
    """What a per-case results writer has written in this run, so that the run's summary counts the files that
    exist, not the inputs it was given, and no case overwrites another's results.

    A writer calls :meth:`claim` before writing a case (a second case of the same name, compared ignoring case, is
    refused before any of its files is written; the first claim makes the output folder this run's, see
    :meth:`claim_folder`), writes the case's files with :meth:`write_case` (all or none: a
    write that fails leaves none of them, the earlier files under their names intact, and ends the run with a
    ``DataError`` naming the file) and calls :meth:`record` once they are in place, so a case whose write failed is
    never counted as written. :meth:`write_summary`, called once the run is over
    (``"$print(@results_writer.write_summary(@datalist, 'masks'))"`` in a config), writes
    ``<output_dir>/inference_summary.json`` and returns the one-line account to print; a run that fails before
    writes none (an earlier run's summary in the folder is left as it was).
    """

    output_dir: Path
    overwrite: bool = False

    def _ledger(self) -> dict[str, dict]:
        if not hasattr(self, "_written"):
            self._written: dict[str, dict] = {}
        return self._written

    def claim_folder(self) -> None:
        """Make :attr:`output_dir` this run's before anything is written in it, once per writer.

        The folder itself is locked (``flock`` on the folder: no lock file is left among the results) until the
        process ends, so two runs started at once into one folder cannot write over each other's cases and
        summary. A folder that already holds files (not hidden ones) holds an earlier run's results: writing into
        it would replace some of them and leave others beside the new ones, under one new summary that does not
        list them. It is refused unless :attr:`overwrite` is set; then the files of the same names are replaced
        and the summary lists the earlier files left beside the new ones (``earlier_files``).

        Raises:
            DataError: naming the folder, when another run is writing into it or it holds earlier results.
        """
        if hasattr(self, "_earlier_files"):
            return
        folder = self.output_dir
        try:
            folder.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(folder, os.O_RDONLY)
        except OSError:  # a folder that cannot be made or opened: the case's own write names the file and why
            self._earlier_files: list[str] = []
            return
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            descriptor = None
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # a file system without locks (some network mounts): the earlier results are still looked for
                logger.warning(
                    f"{folder}: cannot be locked ({error.strerror or error}); runs into it are not kept apart"
                )
            else:
                raise DataError(
                    folder,
                    "another run is writing its results into this folder now; two runs in one folder would write "
                    "over each other's results.",
                    "Give each run its own --output_dir.",
                ) from None
        earlier, shown = earlier_results(folder)
        if earlier and not self.overwrite:
            if descriptor is not None:
                os.close(descriptor)  # releases the lock: nothing was written
            raise DataError(
                folder,
                f"holds {len(earlier)} files of an earlier run ({shown}); this run's results would replace some of "
                "them and leave the others beside its own.",
                "Give a new --output_dir, or pass --results_writer#overwrite True to replace the files of the same "
                "names (inference_summary.json then lists the earlier files left beside them).",
            )
        self._folder_lock = descriptor  # held open, so locked, until the summary is written or the process ends
        self._earlier_files = earlier

    def release_folder(self) -> None:
        """Let go of the folder's lock once the run's summary is written (a long-lived process, a Deploy app, would
        otherwise hold one open folder per run); its results keep any later run out unless it overwrites them."""
        descriptor = getattr(self, "_folder_lock", None)
        if descriptor is not None:
            self._folder_lock = None
            os.close(descriptor)

    def claim(self, name: str, source: str) -> None:
        self.claim_folder()
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

    def refuse(self, item: Mapping) -> None:
        """Count a refused input (:func:`clinseg.datasets.refusals.mark_refused`): listed in the summary under
        ``refused``; :meth:`raise_if_refused` ends the run with it once the others are written."""
        if not hasattr(self, "_refused"):
            self._refused: list[dict] = []
        self._refused.append(dict(item))

    @property
    def refused(self) -> list[dict]:
        return list(getattr(self, "_refused", []))

    def raise_if_refused(self) -> None:
        """End the run with its refusals once its results and summary are written: exit status 1 and one line,
        the input's own error when one was refused, else a count naming the summary that lists them.

        Raises:
            DataError: when any input was refused.
        """
        refused = self.refused
        if len(refused) == 1:
            raise refusal_error(refused[0])
        if refused:
            written = len(self.written)
            listed = self.output_dir / f"{RESERVED_RESULT_NAMES[0]}.json" if written else None
            raise DataError(
                refused[0]["refused_file"] if not listed else listed,
                f"{len(refused)} inputs were refused and not segmented (each named above"
                + (", and under 'refused' here" if listed else "")
                + f"): {', '.join(_input_name(item) for item in refused)}; written: {written}.",
            )

    @property
    def written(self) -> list[dict]:
        return list(self._ledger().values())

    def write_summary(
        self, datalist: Sequence[Mapping] | None = None, what: str = "results", model: Mapping | None = None
    ) -> str:
        """Write ``inference_summary.json`` (the cases written, those renamed, refused (:meth:`refuse`) or not
        written, and ``model``: what inferred them, :func:`clinseg.pipelines.runs.provenance`) and return the line to
        print. A run whose every input was refused writes none (its error lines say it all)."""
        cases, refused = self.written, self.refused
        if refused and not cases:  # every input refused: the error lines say it all, and no folder is left
            return f"wrote none of {len(datalist) if datalist is not None else len(refused)} {what}"
        self.claim_folder()  # a run that wrote no case still must not replace an earlier run's summary
        renamed = [case for case in cases if case.get("original_id", case["id"]) != case["id"]]
        assumed = [case for case in cases if case.get("geometry_assumed")]
        accounted = {str(case["id"]) for case in cases} | {str(item.get("id")) for item in refused}
        missing = [item for item in datalist or [] if str(item.get("id")) not in accounted]
        summary = {
            "n_inputs": len(datalist) if datalist is not None else len(cases),
            "n_written": len(cases),
            "cases": cases,
            "renamed": [{"source": c["source"], "original_id": c["original_id"], "id": c["id"]} for c in renamed],
            "geometry_assumed": [
                {"id": c["id"], "source": c["source"], "geometry": c["geometry_assumed"]} for c in assumed
            ],
            "refused": [
                {"id": item.get("id"), "source": item.get("source", item.get("image")), "problem": item["refused"]}
                for item in refused
            ],
            "not_written": [str(item.get("source", item.get("image", item.get("id")))) for item in missing],
        }
        written_files = {name for case in cases for name in case.get("files", [])}
        summary_name = f"{RESERVED_RESULT_NAMES[0]}.json"
        kept = [name for name in getattr(self, "_earlier_files", []) if name not in written_files | {summary_name}]
        if kept:  # written with overwrite into a folder of earlier results: what in it is not this run's
            summary["earlier_files"] = kept
        if model:
            summary["model"] = dict(model)
        path = atomic_write_json(self.output_dir / f"{RESERVED_RESULT_NAMES[0]}.json", summary)
        self.release_folder()
        message = (
            f"wrote {len(cases)} of {summary['n_inputs']} {what} to {self.output_dir.resolve()} (list: {path.name})"
        )
        if renamed:
            message += "; renamed to keep results apart: " + ", ".join(
                f"{Path(c['source']).name} -> {c['id']}" for c in renamed
            )
        if assumed:
            message += f"; geometry ASSUMED for {len(assumed)} (see 'geometry_assumed' in their JSON)"
        if refused:
            message += f"; REFUSED {len(refused)} (see 'refused'): " + ", ".join(map(_input_name, refused))
        if missing:
            message += f"; NOT written: {', '.join(summary['not_written'])}"
        if kept:
            message += f"; {len(kept)} files of an earlier run are also in the folder ('earlier_files')"
        return message


def _input_name(item: Mapping) -> str:
    """The file name of a data-list item's input, with its frame (``volume.dcm::3``) where it is one of several."""
    return Path(str(item.get("image") or item.get("source") or item.get("id"))).name


class SaveSegmentationd(MapTransform, ResultLedger):
    """Write, per image, the label map (index PNG), a colour overlay PNG and a JSON summary.

    Use after the prediction is inverted to the input's grid and turned into a ``(1, H, W)`` label map. Outputs
    are ``<output_dir>/<id>_seg.png``, ``<id>_overlay.png``, ``<id>.json``, and ``<id>_prob.png`` (foreground
    probability, 0-255) when ``prob_key`` names a ``(2, H, W)`` probability map.

    The summary gives each class's area fraction (inside the field of view when ``fov_key`` is given; the
    prediction outside it is set to background) and, with ``thickness=True`` (layered tissue such as the retina in
    OCT), each class's mean thickness per column in pixels, and in micrometres when ``pixel_size_um`` is given, over
    the columns the tissue is in (``thickness_columns``; null when no column holds any).

    ``output_dir`` must not hold an earlier run's results unless ``overwrite`` (:meth:`ResultLedger.claim_folder`).
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
        pixel_size_um: PositiveFloat | None = None,
        overwrite: bool = False,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
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
                files[f"{name}_prob.png"] = png_writer(np.rint(np.clip(probability, 0, 1) * 255).astype(np.uint8))
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
                **_retina_frame(d.get(self.image_key)),
                "classes_present": [
                    self.class_names[i] for i in np.unique(label_map) if 0 <= i < len(self.class_names)
                ],
                "area_fraction": {
                    cls: float(((label_map == index) & inside).sum() / n_inside)
                    for index, cls in enumerate(self.class_names)
                },
            }
            if self.thickness:
                # over the columns the tissue is in: a scan's empty margins (no retina) are not layers 0 pixels thick
                tissue = (label_map > 0) & (label_map < len(self.class_names))
                columns = tissue.any(axis=0)
                thickness = {
                    cls: float((label_map[:, columns] == index).sum(axis=0).mean()) if columns.any() else None
                    for index, cls in enumerate(self.class_names)
                    if index
                }
                summary["mean_thickness_px"] = thickness
                summary["thickness_columns"] = int(columns.sum())
                relabelled = getattr(d[key], "meta", {}).get("layer_order_relabelled")
                if relabelled is not None:  # how much the top-to-bottom order changed (``OrderLayersd``)
                    summary["layer_order_relabelled"] = round(float(relabelled), 4)
                # a DICOM B-scan's own row spacing where it has one (``RequireBScand`` checks a given value against
                # it), else the value given for the run
                image_meta = getattr(d.get(self.image_key), "meta", {})
                own = image_meta.get("pixel_size_um")
                pixel_size_um = float(own) if own is not None else self.pixel_size_um
                if pixel_size_um:
                    from_file = image_meta.get("pixel_spacing_um") is not None
                    summary["pixel_size_um"] = pixel_size_um
                    summary["pixel_size_from"] = "the file's PixelSpacing" if from_file else "pixel_size_um"
                    summary["mean_thickness_um"] = {
                        k: None if v is None else v * pixel_size_um for k, v in thickness.items()
                    }
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


def _retina_frame(image) -> dict:
    """``rows_segmented``: the rows of a B-scan the network was shown (``FrameRetinad``), when not all of them; the
    rest are background in the label map."""
    frame = getattr(image, "meta", {}).get("retina_frame") if isinstance(image, torch.Tensor) else None
    if not frame:
        return {}
    return {"rows_segmented": {"first": int(frame["first_row"]), "last": int(frame["first_row"] + frame["rows"] - 1)}}


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


class SaveVolumeSegmentationd(MapTransform, ResultLedger):
    """Write, per volume, the label map as NIfTI on the input's grid, a JSON summary and an overlay picture.

    Use after ``Invertd`` has brought the ``(1, X, Y, Z)`` label map back to the input's grid: the NIfTI gets the
    input's shape and affine (for a DICOM series, its patient space in RAS). The JSON gives each class's voxel
    count and volume in millilitres, the spacing, shape and source; ``<id>_views.png`` shows axial, coronal and
    sagittal slices through the structure. Files are written atomically: a failed case leaves none of its files.
    ``output_dir`` must not hold an earlier run's results unless ``overwrite`` (:meth:`ResultLedger.claim_folder`).
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
        overwrite: bool = False,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
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
        d = dict(data)
        for key in self.key_iterator(d):
            prediction = d[key]
            label_map = to_label_map(prediction).astype(np.uint8)
            affine = to_numpy(prediction.affine).astype(np.float64)
            spacing = np.linalg.norm(affine[:3, :3], axis=0)
            voxel_ml = voxel_volume_ml(affine)  # the true voxel volume, sheared grids too
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
                    cls: round(int((label_map == i).sum()) * voxel_ml, 3) for i, cls in enumerate(self.class_names) if i
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
