"""The MONAI Deploy side of the applications: Holoscan operators around the bundle's own pipeline.

Importing this module imports the MONAI Deploy SDK, Holoscan and, with the SDK, the whole of MONAI (the SDK lives in
the ``monai`` namespace, and ``import monai`` loads every MONAI submodule): seconds. :mod:`.apps` checks the command
line and the paths first and imports this module only then.

- :class:`CTHeartApp` (ct_heart): a DICOM study folder in; the SDK's DICOM loader and series selector (Modality CT
  and an optional rule file) find the candidate series, of which the one with the most slices is segmented
  (localizers never; a tie is refused: :func:`~.runtime.choose_series`); the bundle reads it (HU, geometry
  checks), segments the heart and writes a DICOM Segmentation object through the SDK's highdicom-based writer
  (heart coded as SNOMED CT 80891009, referencing the source series), the mask as NIfTI in the series' patient
  space, a JSON result with the heart volume in mL and the series choice, and orthogonal views.
- :class:`ImageSegmentationApp` (vessels, oct_layers): image files in (PNG/TIFF/JPEG, and Duke ``.mat`` for OCT);
  per image a label map, a colour overlay and a JSON result (vessel area fraction inside the field of view; mean
  thickness of each retinal layer).

Operators record the first failure instead of raising into the scheduler; :func:`clinseg.pipelines.deploy.apps.main`
reports it after the graph has stopped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application, Fragment, Operator, OperatorSpec
from monai.deploy.core.domain.dicom_series_selection import StudySelectedSeries
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator

from clinseg.datasets.ct.dicom import is_localizer
from clinseg.datasets.errors import DataError
from clinseg.pipelines.deploy.runtime import (
    CT_RULES,
    SERIES_CHOICE,
    BundleRuntime,
    SeriesCandidate,
    choose_series,
    staged_outputs,
)

logger = logging.getLogger(__name__)


class _FailureRecorder:
    """Operators record the first failure instead of raising into the scheduler, so that the application can end
    with one clear message and a non-zero exit status after the graph has stopped."""

    failure: BaseException | None = None

    def record(self, error: BaseException) -> None:
        if self.failure is None:
            self.failure = error


class BundleImageOperator(Operator):
    """Source operator: segments every image of the input folder with the bundle's inference pipeline."""

    def __init__(self, fragment: Fragment, *args, runtime: BundleRuntime, input_path: Path, output_path: Path,
                 recorder: _FailureRecorder, **kwargs):  # fmt: skip
        self.runtime, self.input_path, self.output_path, self.recorder = runtime, input_path, output_path, recorder
        super().__init__(fragment, *args, **kwargs)  # the base class calls setup(): attributes first

    def setup(self, spec: OperatorSpec):
        pass

    def compute(self, op_input, op_output, context):
        try:
            datalist = self.runtime.datalist(self.input_path)
            with staged_outputs(self.output_path) as staging:
                account = self.runtime.run(datalist, staging)
            logger.info(account.replace(str(staging.resolve()), str(self.output_path)))
        except Exception as e:  # noqa: BLE001 - reported by the application after the graph stops
            self.recorder.record(e)


class HeartSegmentationOperator(Operator):
    """In: the selected study series (and the loaded studies, to report what was there). Out: files only."""

    def __init__(self, fragment: Fragment, *args, runtime: BundleRuntime, input_path: Path, output_path: Path,
                 recorder: _FailureRecorder, **kwargs):  # fmt: skip
        self.runtime, self.input_path, self.output_path, self.recorder = runtime, input_path, output_path, recorder
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("study_selected_series_list")
        spec.input("dicom_study_list")

    def compute(self, op_input, op_output, context):
        selected = op_input.receive("study_selected_series_list")
        studies = op_input.receive("dicom_study_list")
        try:
            self.segment(selected, studies)
        except Exception as e:  # noqa: BLE001 - reported by the application after the graph stops
            self.recorder.record(e)

    def segment(self, selected, studies) -> None:
        seg_problem = None
        if selected and any(study.selected_series for study in selected):
            chosen, skipped = self.choose_selected(selected, studies)
            series = chosen.source.series
            datasets = [instance.get_native_sop_instance() for instance in series.get_sop_instances()]
            series_uid = str(series.SeriesInstanceUID)
            files = every_file_of_series(series_uid, [str(ds.filename) for ds in datasets])
            # the SEG references the segmented series only (the SDK's writer takes each study's first selected one)
            selected = [StudySelectedSeries(chosen.source.study)]
            selected[0].add_selected_series(chosen.source.selected)
        else:
            chosen, skipped = self.unloaded_ct_series(studies)
            files = chosen.source.files
            datasets, series_uid = [], chosen.uid
            seg_problem = (
                "not written: the series is anonymised with empty SOPInstanceUID/SeriesInstanceUID, and a DICOM "
                "Segmentation must reference its source instances by UID"
                if not chosen.uid
                else "not written: the SDK's DICOM loader could not read the series' files (no DICOM file meta "
                "header, as ACR-NEMA-style exports are written), and its Segmentation writer references only the "
                "instances it loaded"
            )
        selection = {"rule": SERIES_CHOICE, "selected": chosen.record(), "skipped": skipped}
        logger.info(f"{self.input_path}: segmenting series {chosen.label()}")
        for record in skipped:
            n, description = record["n_slices"], record["series_description"] or "(no description)"
            logger.info(f"{self.input_path}: skipped series {description!r} ({n} slice{'' if n == 1 else 's'}, "
                        f"UID {record['series_instance_uid'] or '(empty)'}): {record['reason']}")  # fmt: skip
        with staged_outputs(self.output_path) as staging:
            try:
                self.runtime.run([{"image": files, "id": "series", "source": files[0]}], staging)
            except Exception as e:
                damaged = damaged_file_error(files)
                if damaged is None:
                    raise
                raise damaged from e
            if seg_problem is None:
                try:  # a SEG that cannot be made must not cost the NIfTI and JSON results
                    frames = dicom_frames(staging / "series_seg.nii.gz", datasets)
                    write_dicom_seg(frames, selected, datasets, staging / "dicom_seg", self.runtime)
                except Exception as e:  # noqa: BLE001 - reported in the JSON and the log
                    shutil.rmtree(staging / "dicom_seg", ignore_errors=True)
                    seg_problem = f"not written: no DICOM SEG could be made for this series ({type(e).__name__}: {e})"
                    logger.warning(f"{self.input_path}: DICOM SEG {seg_problem}; NIfTI and JSON results are written.")
            else:
                logger.warning(f"{self.input_path}: DICOM SEG {seg_problem}; NIfTI and JSON results are written.")
            summary = json.loads((staging / "series.json").read_text())
            summary.update(
                input=str(self.input_path),
                series_instance_uid=series_uid,
                n_slices=len(files),
                series_selection=selection,
                dicom_seg="written to dicom_seg/" if seg_problem is None else seg_problem,
            )
            (staging / "series.json").write_text(json.dumps(summary, indent=2))
        heart_ml = summary["volume_ml"].get("heart")
        withheld = f"heart volume withheld ({summary.get('volume_withheld')})"
        volume = f"heart {heart_ml:.1f} mL" if heart_ml is not None else withheld
        logger.info(f"{volume}; results in {self.output_path}")

    def choose_selected(self, selected, studies) -> tuple[SeriesCandidate, list[dict]]:
        """The series to segment among those the selector matched (:func:`choose_series`), and the skipped ones:
        the other matches, and the loaded series no rule matched."""
        candidates = {}
        for study_selection in selected:
            for item in study_selection.selected_series:
                source = _Selected(study_selection.study, item, item.series)
                candidates.setdefault(id(item.series), sdk_candidate(item.series, source))
        chosen, skipped = choose_series(self.input_path, list(candidates.values()))
        for study in studies or []:
            for series in study.get_all_series():
                if id(series) not in candidates:
                    modality = getattr(series, "Modality", None) or "?"
                    reason = f"not matched by the selection rules (Modality {modality})"
                    skipped.append(sdk_candidate(series).record(reason=reason))
        return chosen, skipped

    def unloaded_ct_series(self, studies) -> tuple[SeriesCandidate, list[dict]]:
        """The CT series the SDK's loader left out, found by the project's reader: slices with empty UIDs
        (anonymised exports, which the loader drops; grouped by geometry) and files without a DICOM file meta
        header (ACR-NEMA-style exports, which the loader cannot parse; the reader decodes them in the encoding
        found). The series to segment among them (chosen as among the SDK's) and the skipped ones, or an error
        naming the input and what it holds."""
        import pydicom

        from clinseg.datasets.ct.dicom import list_ct_series

        series = []
        for folder in series_folders(self.input_path):  # as the SDK's loader, which reads subfolders too
            try:
                series += list_ct_series(folder)
            except DataError:
                continue
        loaded = {str(s.SeriesInstanceUID) for study in studies or [] for s in study.get_all_series()}
        unloaded = [s for s in series if s.modality == "CT" and (not s.uid or s.uid not in loaded)]
        if unloaded:
            candidates = []
            for s in unloaded:
                image_type = pydicom.dcmread(s.files[0], stop_before_pixels=True, force=True).get("ImageType")
                candidates.append(SeriesCandidate(uid=s.uid or "", description=s.description, number=s.number,
                                                  n_slices=s.n_files, localizer=is_localizer(image_type),
                                                  source=s))  # fmt: skip
            return choose_series(self.input_path, candidates)
        found = {f"{s.modality or '?'} ({s.n_files} files)" for s in series}
        for study in studies or []:
            found |= {f"{s.Modality} ({len(s.get_sop_instances())} files)" for s in study.get_all_series()}
        listing = ", ".join(sorted(found)) or "no DICOM series"
        raise DataError(self.input_path, f"holds no CT series matching the selection rules (found: {listing}).")


def series_folders(input_path: Path) -> list[Path]:
    """``input_path`` and its subfolders at any depth (hidden ones aside), where the SDK's loader looks for DICOM
    files too: a study exported as one folder per series."""
    if not input_path.is_dir():
        return [input_path]
    found = [input_path]
    for root, folders, _ in os.walk(input_path):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        found += [Path(root) / name for name in folders]
    return found


def every_file_of_series(uid: str, loaded: list[str]) -> list[str]:
    """Every file of series ``uid`` in the folders of the files the SDK's loader gave (``loaded``). The loader keeps
    one instance per slice position and drops the others ("Duplicate spatial coordinates"), so a multi-phase cardiac
    series reaches the operator as a mix of its phases, one slice each, which reads as one plausible volume; given
    every file, the project's reader refuses the several acquisitions, naming what tells them apart, as the bundle
    does. A folder the scan cannot read keeps what the loader gave."""
    from clinseg.datasets.ct.dicom import list_ct_series

    found = {str(Path(f)) for f in loaded}
    for folder in sorted({Path(f).parent for f in loaded}):
        try:
            found.update(str(f) for info in list_ct_series(folder) if info.uid == uid for f in info.files)
        except DataError:
            continue
    return sorted(found)


def damaged_file_error(files: list[str]) -> DataError | None:
    """The damaged DICOM file beside the segmented series' slices, if any: the SDK's loader skips files it cannot
    parse, so an empty or damaged slice first shows up as a gap in the series; the project's scan of the folders
    that hold the series names the file itself. Only the folders of the series are scanned (the SDK's loader also
    reads a study's subfolders, which the project's scan of the input folder does not), and only an error naming a
    file counts, so that the series' own problem is never replaced by a verdict on another folder."""
    from clinseg.datasets.ct.dicom import list_ct_series

    for folder in sorted({Path(f).parent for f in files}):
        try:
            list_ct_series(folder)
        except DataError as e:
            if Path(e.path) != folder:
                return e
    return None


def sdk_candidate(series, source=None) -> SeriesCandidate:
    """An SDK series (``DICOMSeries``) as :func:`choose_series` weighs it; localizer if any of its images is."""
    datasets = [instance.get_native_sop_instance() for instance in series.get_sop_instances()]
    number = datasets[0].get("SeriesNumber") if datasets else None
    return SeriesCandidate(
        uid=str(series.SeriesInstanceUID or ""),
        description=str(datasets[0].get("SeriesDescription", "") or "") if datasets else "",
        number=int(number) if number not in (None, "") else None,
        n_slices=len(datasets),
        localizer=any(is_localizer(ds.get("ImageType")) for ds in datasets),
        source=source,
    )


class _Selected(NamedTuple):
    """Where a series the selector matched came from: its study, the selector's item and the series itself."""

    study: object
    selected: object
    series: object


# the NIfTI header keeps the affine in float32: a position several hundred mm from the origin moves by ~1e-4 mm
AFFINE_ROUNDING_MM = 1e-3


def dicom_frames(mask_path: Path, datasets: list) -> np.ndarray:
    """The NIfTI mask as DICOM frames ``(n_slices, rows, columns)`` in the order of ``datasets``: each slice is found
    through its ImagePositionPatient and the mask's affine, so no slice order is assumed.

    The tolerances are the series reader's (:mod:`clinseg.datasets.ct.dicom`), which built the segmented grid from
    these slices: a slice origin may lie up to ``IN_PLANE_TOL_MM`` off the grid's stacking line, and along it the
    slices may be unevenly stepped (each step within the reader's spacing tolerance of the median), so each slice
    is mapped to its nearest grid plane; every plane must receive exactly one slice."""
    import nibabel as nib

    from clinseg.datasets.ct.dicom import IN_PLANE_TOL_MM

    image = nib.load(mask_path)
    mask = np.asarray(image.dataobj).astype(np.uint8)
    affine = np.asarray(image.affine, dtype=np.float64)
    if mask.ndim != 3 or mask.shape[2] != len(datasets):
        raise DataError(mask_path, f"the mask has shape {list(mask.shape)}, but the series has {len(datasets)} "
                        "slices: it is not on the series' grid.")  # fmt: skip
    step = np.linalg.norm(affine[:3, 2])
    normal = affine[:3, 2] / step
    planes: dict[int, str] = {}
    frames = []
    for ds in datasets:
        name = str(getattr(ds, "filename", "slice"))
        if (int(ds.Columns), int(ds.Rows)) != mask.shape[:2]:
            raise DataError(name, f"has {ds.Rows} rows and {ds.Columns} columns, the segmented volume "
                            f"{mask.shape[1]} rows and {mask.shape[0]} columns.")  # fmt: skip
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        offset = np.array([-x, -y, z]) - affine[:3, 3]  # DICOM LPS to the mask's RAS, from the grid's first slice
        along = float(offset @ normal)
        off_line = float(np.linalg.norm(offset - along * normal))
        k = int(round(along / step))
        if off_line > IN_PLANE_TOL_MM + AFFINE_ROUNDING_MM or not 0 <= k < mask.shape[2]:
            raise DataError(name, f"does not lie on the segmented volume's grid (its origin is {off_line:.3f} mm off "
                            f"the grid's stacking line, {along / step:.2f} slice steps along it; the grid has "
                            f"{mask.shape[2]} slices).")  # fmt: skip
        if k in planes:
            raise DataError(name, f"is nearest to the same plane of the segmented volume's grid ({k}) as "
                            f"{planes[k]}: the slices are not evenly stacked on that grid.")  # fmt: skip
        planes[k] = name
        frames.append(mask[:, :, k].T)  # the mask is [column, row]; a frame is [row, column]
    return np.stack(frames)


# CID 7150 "Segmentation Property Categories": Anatomical Structure, the category of an organ such as the heart
ANATOMICAL_STRUCTURE = ("123037004", "SCT", "Anatomical Structure")


def default_character_set(datasets: list) -> None:
    """An empty SpecificCharacterSet (as some scanners write it) means the default repertoire; highdicom copies the
    source's value into the SEG and refuses an empty one, so the empty element is removed (same meaning)."""
    for ds in datasets:
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            del ds.SpecificCharacterSet


def write_dicom_seg(frames: np.ndarray, selected, datasets: list, output_dir: Path, runtime: BundleRuntime) -> None:
    """A DICOM Segmentation object (SDK writer, highdicom) referencing the selected series; one segment per class,
    coded as an anatomical structure, with the bundle's palette colour as its recommended display colour."""
    import highdicom as hd
    from monai.deploy.operators.dicom_seg_writer_operator import DICOMSegmentationWriterOperator, SegmentDescription
    from monai.deploy.operators.dicom_utils import ModelInfo
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    class DisplayedSegment(SegmentDescription):  # the SDK's description has no display colour
        def __init__(self, *args, rgb=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.rgb = rgb

        def to_segment_description(self, segment_number: int):
            description = super().to_segment_description(segment_number)
            if self.rgb is not None:
                colour = hd.color.CIELabColor.from_rgb(*(int(v) for v in self.rgb))
                description.RecommendedDisplayCIELabValue = list(colour.value)
            return description

    default_character_set(datasets)
    version = str(runtime.config.get("_meta_", {}).get("version", "0.1.0"))
    segment_types = {"heart": codes.SCT.Heart}
    palette = runtime.config.get("palette") or []
    descriptions = [
        DisplayedSegment(
            segment_label=name.capitalize(),
            segmented_property_category=Code(*ANATOMICAL_STRUCTURE),
            segmented_property_type=segment_types.get(name, codes.SCT.Organ),
            algorithm_name=runtime.bundle_name,
            algorithm_family=codes.DCM.ArtificialIntelligence,
            algorithm_version=version,
            rgb=palette[index] if index < len(palette) else None,
        )
        for index, name in enumerate(runtime.class_names[1:], start=1)
    ]
    writer = DICOMSegmentationWriterOperator(
        Fragment(),
        segment_descriptions=descriptions,
        output_folder=output_dir,
        custom_tags={"SeriesDescription": f"{runtime.bundle_name} segmentation, research use only"},
        model_info=ModelInfo("clinical-seg-pipeline", runtime.bundle_name, version, ""),
        omit_empty_frames=False,  # one frame per source slice: consumers need not reconstruct missing frames
        name="dicom_seg_writer",
    )
    writer.process_images(frames, selected, output_dir)


class _BundleApp(Application, _FailureRecorder):
    """An application over a loaded :class:`BundleRuntime`; the paths were checked by :mod:`.apps` beforehand."""

    def __init__(self, runtime: BundleRuntime, input_path: Path, output_path: Path, *args, **kwargs):
        self.runtime, self.input_path, self.output_path = runtime, Path(input_path), Path(output_path)
        super().__init__(*args, **kwargs)

    def context(self):
        return self.runtime, self.input_path, self.output_path


class ImageSegmentationApp(_BundleApp):
    """Image files in; label maps, overlays and JSON results out (vessels, oct_layers)."""

    def compose(self):
        runtime, input_path, output_path = self.context()
        segment = BundleImageOperator(
            self, CountCondition(self, 1), runtime=runtime, input_path=input_path, output_path=output_path,
            recorder=self, name="bundle_image_segmentation",
        )  # fmt: skip
        self.add_operator(segment)


class CTHeartApp(_BundleApp):
    """A DICOM study folder in; DICOM SEG, NIfTI mask, JSON heart volume and pictures out."""

    def compose(self):
        runtime, input_path, output_path = self.context()
        # the series selection rule is configurable: series_rules.json beside app.py (the SDK's rule format)
        rules_file = runtime.config_path.parents[1] / "series_rules.json"
        rules = json.loads(rules_file.read_text()) if rules_file.is_file() else CT_RULES
        # must_load=False: an input without DICOM files reaches the segmentation operator, which names the problem
        loader = DICOMDataLoaderOperator(
            self, CountCondition(self, 1), input_folder=input_path, must_load=False, name="dicom_loader"
        )
        # every matching series, most slices first; HeartSegmentationOperator chooses one (runtime.choose_series)
        selector = DICOMSeriesSelectorOperator(
            self, rules=json.dumps(rules), all_matched=True, sort_by_sop_instance_count=True, name="series_selector"
        )
        segment = HeartSegmentationOperator(
            self, runtime=runtime, input_path=input_path, output_path=output_path, recorder=self,
            name="heart_segmentation",
        )  # fmt: skip
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(loader, segment, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, segment, {("study_selected_series_list", "study_selected_series_list")})
