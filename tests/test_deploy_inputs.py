"""The Deploy applications on inputs laid out as studies are exported, and what their output folder holds.

- a study exported as one folder per series (``study/CT/*.dcm``), which the SDK's DICOM loader reads: a refused
  series is refused for its own problem, named by the series folder, and an anonymised series (empty UIDs, which
  the SDK's loader drops) is found there too;
- the output folder: a run publishes its staged results only into a folder that still holds no other run's
  results, and never replaces a file there, so two runs given one folder never mix or clobber their results.

The CT app's graph runs with :mod:`tests.test_deploy`'s stand-in runtime (the bundle's reader and checks, no model),
in the deploy environment.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clinseg.datasets.errors import DataError
from tests.test_deploy import deploy_environment, result_files, run_stand_in_app  # noqa: F401 - autouse fixture


def write_series(folder: Path, hu: np.ndarray, **kwargs) -> list[Path]:
    from clinseg.datasets.ct.dicom import write_ct_series

    return write_ct_series(hu, np.diag([0.7, 0.8, 2.5, 1.0]), folder, series_description="Axial 2.5mm", **kwargs)


def chest_like_hu(shape=(24, 20, 6)) -> np.ndarray:
    return np.random.default_rng(0).normal(0, 300, shape).round().clip(-1024, 2000).astype(np.float32)


def test_ct_app_names_the_problem_of_a_series_in_a_study_subfolder(tmp_path):
    """A series stored without its rescale intercept (values 0..3000, not HU) in ``study/CT/``: the app refuses it
    for that, naming the series folder, as the bundle does; not with a verdict on the study folder ("holds no DICOM
    image files ... subfolders are not searched"), which the SDK's loader did search."""
    study = tmp_path / "study"
    write_series(study / "CT", chest_like_hu() + 1024, intercept=0.0)
    failure, _ = run_stand_in_app(tmp_path, study, tmp_path / "out", mask_shape=[24, 20, 6])
    assert failure is not None and failure.startswith(f"DataError: {study / 'CT'}"), failure
    assert "does not look like Hounsfield units" in failure, failure
    assert result_files(tmp_path / "out") == []

    # a damaged slice beside the series' other slices is still named (the SDK's loader skipped it)
    damaged = tmp_path / "damaged"
    files = write_series(damaged / "CT", chest_like_hu(), file_names="index")
    files[3].write_bytes(files[3].read_bytes()[:300])
    failure, _ = run_stand_in_app(tmp_path, damaged, tmp_path / "out_damaged", mask_shape=[24, 20, 6])
    assert failure is not None and failure.startswith(f"DataError: {files[3]}"), failure


def test_ct_app_segments_an_anonymised_series_in_a_study_subfolder(tmp_path):
    """Empty SOPInstanceUID/SeriesInstanceUID (the SDK's loader drops such files) in ``study/CT/``: the project's
    reader finds the series there, as it does in the study folder itself, instead of "no CT series"."""
    study = tmp_path / "study"
    files = write_series(study / "CT", chest_like_hu(), anonymise_uids=True)
    out = tmp_path / "out"
    failure, _ = run_stand_in_app(tmp_path, study, out, mask_shape=[24, 20, 6])
    assert failure is None, failure
    summary = json.loads((out / "series.json").read_text())
    assert summary["n_slices"] == len(files) and summary["series_instance_uid"] == ""
    assert summary["series_selection"]["selected"]["series_description"] == "Axial 2.5mm"
    assert summary["dicom_seg"].startswith("not written: the series is anonymised")


def test_ct_app_segments_a_series_written_without_a_dicom_file_meta(tmp_path):
    """ACR-NEMA-style files (no preamble, no group 0002), which the SDK's loader cannot parse: the app said "holds
    no CT series matching the selection rules (found: CT (6 files))" while the bundle reads them. The project's
    reader finds the series; its UID is kept, and the DICOM SEG, which the SDK writes only for instances it loaded,
    is not written, saying why."""
    import pydicom

    study = tmp_path / "study"
    for path in write_series(tmp_path / "with_meta", chest_like_hu(), series_uid="1.2.3.4.9", file_names="index"):
        ds = pydicom.dcmread(path)
        ds.preamble, ds.file_meta = None, pydicom.dataset.FileMetaDataset()
        (study / "CT").mkdir(parents=True, exist_ok=True)
        ds.save_as(study / "CT" / path.stem, implicit_vr=True, little_endian=True, enforce_file_format=False)
    out = tmp_path / "out"
    failure, log = run_stand_in_app(tmp_path, study, out, mask_shape=[24, 20, 6])
    assert failure is None, failure
    summary = json.loads((out / "series.json").read_text())
    assert summary["n_slices"] == 6 and summary["series_instance_uid"] == "1.2.3.4.9", summary
    assert summary["dicom_seg"].startswith("not written: the SDK's DICOM loader could not read the series' files")


def test_staged_results_never_mix_with_another_runs(tmp_path):
    """Two runs given one output folder (both found it empty when they started): the one that publishes second
    withdraws its results with one line naming the folder, and the first run's results stay whole, instead of
    both summaries being merged into the folder, one replacing the other."""
    from clinseg.pipelines.deploy.runtime import staged_outputs

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError) as refused:
        with staged_outputs(out) as staging:
            (staging / "21.json").write_text('{"run": "second"}')
            (staging / "inference_summary.json").write_text('{"run": "second"}')
            # meanwhile the other run publishes its own results into the same folder
            with staged_outputs(out) as other:
                (other / "22.json").write_text('{"run": "first"}')
                (other / "inference_summary.json").write_text('{"run": "first"}')
    assert refused.value.path == str(out) and "another run's results while this run ran" in refused.value.problem
    assert sorted(p.name for p in out.iterdir()) == ["22.json", "inference_summary.json"]
    assert json.loads((out / "inference_summary.json").read_text()) == {"run": "first"}

    # a run whose files all publish: moved into place under their names, subfolders included, staging gone
    fresh = tmp_path / "fresh"
    with staged_outputs(fresh) as staging:
        (staging / "dicom_seg").mkdir()
        (staging / "dicom_seg" / "1.2.3.dcm").write_bytes(b"seg")
        (staging / "series.json").write_text("{}")
    assert [p.relative_to(fresh).as_posix() for p in sorted(fresh.rglob("*"))] == [
        "dicom_seg", "dicom_seg/1.2.3.dcm", "series.json",
    ]  # fmt: skip


def test_staged_results_never_replace_a_file_that_appeared_meanwhile(tmp_path):
    """A file of the same name placed by another run between this run's check of the folder and its own placing
    (a hidden file stands in for the narrow window; hidden entries are not results): kept, and this run's files,
    those placed before the conflict included, are removed again."""
    from clinseg.pipelines.deploy.runtime import publish_staged

    out, staging = tmp_path / "out", tmp_path / "out" / ".staging-test"
    (staging / "dicom_seg").mkdir(parents=True)
    (staging / "dicom_seg" / "1.2.3.dcm").write_bytes(b"mine")
    (staging / "-first.json").write_text("{}")  # placed before the conflict ('-' sorts before '.')
    (staging / ".series.json").write_text('{"run": "mine"}')
    (out / ".series.json").write_text('{"run": "other"}')
    with pytest.raises(DataError) as refused:
        publish_staged(staging, out)
    assert refused.value.path == str(out / ".series.json")
    assert "was written by another run given the same output folder" in refused.value.problem
    assert (out / ".series.json").read_text() == '{"run": "other"}'
    assert sorted(p.name for p in out.iterdir()) == [".series.json", ".staging-test"], "this run's files withdrawn"


STAGING_RUN = """
import sys, time
from clinseg.pipelines.deploy.runtime import staged_outputs

with staged_outputs(sys.argv[1]) as staging:
    (staging / "series_seg.nii.gz").write_bytes(b"partial")
    print(staging.name, flush=True)
    time.sleep(120)
"""


def test_a_killed_runs_staging_folder_is_removed_and_a_live_runs_kept(tmp_path):
    """A run killed outright (SIGKILL, the out-of-memory killer) cannot remove its staging folder: it stayed in the
    output folder for good, beside the next run's results. The next run into the folder removes it, and never the
    staging folder of a run that is still writing; the owner record is not published as a result."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"

    def start() -> tuple[subprocess.Popen, str]:
        run = subprocess.Popen([sys.executable, "-c", STAGING_RUN, str(out)], stdout=subprocess.PIPE, text=True)
        return run, run.stdout.readline().strip()

    live, live_staging = start()
    killed, killed_staging = start()
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        assert (out / killed_staging / "series_seg.nii.gz").is_file(), "the killed run left its staging folder"
        from clinseg.pipelines.deploy.runtime import staged_outputs

        with staged_outputs(out) as staging:
            (staging / "series.json").write_text("{}")
        assert sorted(p.name for p in out.iterdir()) == [live_staging, "series.json"]
        assert (out / live_staging / "series_seg.nii.gz").read_bytes() == b"partial", "the live run's is kept"
    finally:
        live.kill()
        live.wait(timeout=30)
        killed.kill()


def test_ct_app_refuses_a_multi_phase_series_the_sdk_loader_reduced_to_one_slice_per_position(tmp_path):
    """Two cardiac phases under one series UID: the SDK's loader keeps one file per position (a mix of the phases,
    which read as one plausible volume, exit 0); the app gives the reader every file of the series, and it is refused
    naming what tells the phases apart, as the bundle refuses it."""
    from tests.test_ct_dicom import acquisition

    study = tmp_path / "study"
    for phase, seed in ((0, 1), (40, 2)):
        files = write_series(study / "CT", chest_like_hu(), study_uid="1.2.3.4", series_uid="1.2.3.4.7", seed=seed)
        acquisition(files, AcquisitionNumber=1, NominalPercentageOfCardiacPhase=phase)
    failure, _ = run_stand_in_app(tmp_path, study, tmp_path / "out", mask_shape=[24, 20, 6])
    assert failure is not None and failure.startswith(f"DataError: {study / 'CT'}"), failure
    assert "several acquisitions at the same slice positions" in failure, failure
    assert "differ in NominalPercentageOfCardiacPhase" in failure, failure
    assert result_files(tmp_path / "out") == []
