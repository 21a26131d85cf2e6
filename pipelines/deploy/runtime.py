"""What a deployed application runs: the bundle's own inference pipeline with the exported model.

The application folder holds the bundle's self-contained inference config (``bundle/inference.json``, overrides
applied, written by :mod:`clinseg.pipelines.deploy.build`), so the app preprocesses, infers and writes exactly as
``python -m monai.bundle run inferring`` does; only the network is swapped for the shipped model (TorchScript, or
a checkpoint loaded into ``network_def``) and the checkpoint loader is dropped. Outputs are written to a staging
folder inside the output folder and moved into place only when every input has succeeded, so a failed run leaves no
partial files that look like results.

torch and MONAI are imported on first use: :mod:`.apps` finds the model file (:func:`find_model_file`) while it
checks the command line, before the seconds those imports take.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from clinseg.datasets.errors import DataError
from clinseg.pipelines.paths import process_alive

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# the default DICOM series selection (the SDK's rule format): the series whose Modality is CT. The selector returns
# every series a rule matches (``all_matched``), and :func:`choose_series` picks the one to segment: localizers are
# excluded there, not by an ImageType condition here, since the SDK's matching drops a series without ImageType and
# fails on a single-valued one.
CT_RULES = {"selections": [{"name": "CT series", "conditions": {"Modality": "(?i)^CT$"}}]}

SERIES_CHOICE = (
    "the series with the most slices among those the selection rules match; localizers (ImageType LOCALIZER: "
    "scouts, topograms) are never segmented, and a tie for the most slices is refused"
)


@dataclass(frozen=True)
class SeriesCandidate:
    """A series the selection rules matched, as :func:`choose_series` weighs it; ``source`` is the caller's own
    record of it (where the SDK's selector found it, or the project reader's series)."""

    uid: str
    description: str
    number: int | None
    n_slices: int
    localizer: bool = False
    source: object = field(default=None, compare=False, repr=False)

    def label(self) -> str:
        number = f"series {self.number}, " if self.number is not None else ""
        description = self.description or "(no description)"
        slices = f"{self.n_slices} slice{'' if self.n_slices == 1 else 's'}"
        return f"{description!r} ({number}{slices}, UID {self.uid or '(empty)'})"

    def record(self, **extra) -> dict:
        return {
            "series_instance_uid": self.uid,
            "series_description": self.description,
            "series_number": self.number,
            "n_slices": self.n_slices,
            **extra,
        }


def choose_series(where: Path, candidates: list[SeriesCandidate]) -> tuple[SeriesCandidate, list[dict]]:
    """The series to segment among ``candidates`` (see :data:`SERIES_CHOICE`), and a record of each one skipped
    with the reason. The order of ``candidates`` (the SDK lists series in file-system order) never matters: several
    series with the most slices raise a :class:`DataError` naming them, since any pick among them would be arbitrary
    (a site names its series in the app's ``series_rules.json``)."""
    unique = {}
    for candidate in candidates:  # a series matched by several selections counts once
        unique.setdefault(candidate.uid or id(candidate.source), candidate)
    skipped = [c.record(reason="localizer (ImageType LOCALIZER)") for c in unique.values() if c.localizer]
    volumes = sorted((c for c in unique.values() if not c.localizer), key=lambda c: (-c.n_slices, c.uid))
    if not volumes:
        listing = "; ".join(c.label() for c in unique.values())
        raise DataError(where, f"holds only localizer (scout) images among the series matching the selection rules "
                        f"({listing}): there is no CT volume to segment.")  # fmt: skip
    most = [c for c in volumes if c.n_slices == volumes[0].n_slices]
    if len(most) > 1:
        listing = "; ".join(c.label() for c in most)
        raise DataError(
            where,
            f"holds {len(most)} CT series with the same number of slices, so the choice would be arbitrary: {listing}. "
            "Name the one to segment in the app's series_rules.json (e.g. by SeriesDescription or SeriesInstanceUID).",
        )
    chosen = volumes[0]
    skipped += [c.record(reason=f"fewer slices ({c.n_slices} < {chosen.n_slices})") for c in volumes[1:]]
    return chosen, skipped


def find_model_file(model_path: str | os.PathLike) -> Path:
    """The model file at ``model_path``: a file, or a folder holding one ``*.ts``/``*.pt`` file at any depth (the
    MONAI Application Package layout ``models/<name>/model.ts``); else a :class:`DataError` naming the path."""
    path = Path(model_path).absolute()
    if path.is_dir():
        candidates = sorted(p for p in path.rglob("*") if p.suffix in (".ts", ".pt") and p.is_file())
        if len(candidates) != 1:
            listed = f" ({', '.join(str(c.relative_to(path)) for c in candidates[:3])})" if candidates else ""
            raise DataError(path, f"expected one model file (*.ts or *.pt) in this folder, found {len(candidates)}"
                            f"{listed}.")  # fmt: skip
        path = candidates[0]
    if not path.exists():
        raise DataError(path, "the model file does not exist.")
    if not path.is_file():
        raise DataError(path, "is not a model file.")
    return path


def load_network(model_path: str | os.PathLike, config: dict) -> torch.nn.Module:
    """The network of a deployed bundle: a TorchScript export (``model.ts``), or a checkpoint (``model.pt``, a state
    dict) loaded into the bundle's ``network_def``, the path that needs no TorchScript."""
    import torch
    from monai.bundle import ConfigParser

    from clinseg.pipelines.engine.checkpoints import check_state_dict, model_state, read_checkpoint

    path = find_model_file(model_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError:  # not a TorchScript archive: a checkpoint
        pass
    network = ConfigParser(config).get_parsed_content("network_def")
    try:
        state = model_state(read_checkpoint(path, map_location=device))
    except DataError as e:
        if "not a PyTorch checkpoint" not in e.problem:
            raise DataError(path, e.problem) from e
        raise DataError(path, "is neither a TorchScript model nor a PyTorch checkpoint (empty, truncated or another "
                        "kind of file).") from e  # fmt: skip
    try:
        check_state_dict(path, network, state)
    except DataError as e:  # one line: the training hint (--checkpoint_path) does not apply to an app
        raise DataError(path, e.problem) from e
    network.load_state_dict(state)
    return network.to(device).eval()


class BundleRuntime:
    """The bundle's ``infer`` pipeline, run on a data list with a given network, writing into ``output_dir``."""

    def __init__(self, config_path: str | os.PathLike, model_path: str | os.PathLike):
        self.config_path = Path(config_path)
        self.config = json.loads(self.config_path.read_text())
        self.model_path = find_model_file(model_path)
        self.network = load_network(self.model_path, self.config)

    def model_provenance(self) -> dict:
        """What made the results, for their ``inference_summary.json`` (as a bundle's own inference names its
        checkpoint): the model file run and its SHA-256, and, from the build's ``models/export.json`` beside it, the
        checkpoint(s) it was exported from (their SHA-256 and training run) and the decision rule shipped with it."""
        from clinseg.pipelines.runs import sha256_of

        info = {"file": str(self.model_path), "sha256": sha256_of(self.model_path)}
        try:
            built = json.loads((self.model_path.parent / "export.json").read_text())
        except (OSError, ValueError):  # a model placed elsewhere (HOLOSCAN_MODEL_PATH) without its build record
            return info
        for key in ("exported_from", "decision_rule"):
            if key in built:
                info[key] = built[key]
        return info

    @property
    def bundle_name(self) -> str:
        return str(self.config.get("bundle_name", "bundle"))

    @property
    def class_names(self) -> list[str]:
        return list(self.config.get("class_names", []))

    def parser(self, output_dir: Path, **values):
        from monai.bundle import ConfigParser

        parser = ConfigParser(self.config)
        parser["output_dir"] = str(output_dir)
        parser["network"] = self.network
        parser["handlers"] = []  # the weights are in the shipped model; no checkpoint to load
        for key, value in values.items():
            parser[key] = value
        return parser

    def datalist(self, input_path: Path) -> list[dict]:
        """The bundle's own reader of inference inputs, on ``input_path`` (errors name the file and the problem)."""
        parser = self.parser(Path("."), input_dir=str(input_path), input_path=str(input_path))
        return parser.get_parsed_content("datalist")

    def run(self, datalist: list[dict], output_dir: Path) -> str:
        """Segment ``datalist`` into ``output_dir``; the account of what was written (the count of the files the
        bundle's ``results_writer`` wrote, when the config names one, else of the inputs)."""
        parser = self.parser(output_dir)
        parser["datalist"] = datalist
        evaluator = parser.get_parsed_content("evaluator")
        evaluator.run()
        if "results_writer" in parser:
            writer = parser.get_parsed_content("results_writer")
            account = writer.write_summary(datalist, model=self.model_provenance())
            if hasattr(writer, "raise_if_refused"):  # an input refused on its way: the study fails with its error
                writer.raise_if_refused()
            return account
        return f"segmented {len(datalist)} inputs into {output_dir}"


STAGING_PREFIX = ".staging-"
# a staging folder is made under this name with its owner record, then renamed: one named STAGING_PREFIX always
# says who owns it
CLAIMING_PREFIX = ".claiming-"
# in a staging folder: the owning run's host and pid; the run holds a lock on it (flock) while it lives, and the
# kernel drops the lock when the run dies, however it dies (SIGKILL, out of memory)
OWNER_FILE = ".owner.json"
# a claim takes microseconds: one older than this without its owner record was left by a run killed while claiming
CLAIM_STALE_S = 60.0


def _lock(descriptor: int) -> bool | None:
    """Take the lock on an open owner file without waiting: True, False (another process holds it), or None where
    the file system has no such locks."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return None
    return True


def _claim_staging(output_dir: Path) -> tuple[Path, int]:
    """A new staging folder in ``output_dir`` holding its owner record, locked by this process: the folder and the
    open descriptor that holds the lock (closing it releases the lock)."""
    token = uuid.uuid4().hex[:8]
    claiming = output_dir / f"{CLAIMING_PREFIX}{token}"
    claiming.mkdir()
    descriptor = os.open(claiming / OWNER_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if _lock(descriptor) is None:
            logger.warning(f"{output_dir}: the file system has no file locks; a staging folder left by a killed run "
                           "is recognised by its process id alone")  # fmt: skip
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        os.write(descriptor, json.dumps(record).encode())
        staging = output_dir / f"{STAGING_PREFIX}{token}"
        os.rename(claiming, staging)
    except BaseException:
        os.close(descriptor)
        shutil.rmtree(claiming, ignore_errors=True)
        raise
    return staging, descriptor


def _abandoned(folder: Path) -> bool:
    """Whether a staging (or claiming) folder was left by a run that no longer lives: its owner record names this
    host, and no process holds the record's lock (or, without locks, the recorded process is gone). A folder of a
    run on another machine (a shared output folder) is never judged abandoned: whether that run lives cannot be
    told from here."""
    if folder.name.startswith(CLAIMING_PREFIX):  # a claim in progress has its record but maybe not its lock yet
        try:
            if time.time() - folder.stat().st_mtime <= CLAIM_STALE_S:
                return False
        except OSError:
            return False
    try:
        descriptor = os.open(folder / OWNER_FILE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:  # a claim killed before it recorded its owner, or a folder of unknown origin
        return folder.name.startswith(CLAIMING_PREFIX)
    except OSError:
        return False
    try:
        locked = _lock(descriptor)
        if locked is False:  # its run is alive
            return False
        try:
            record = json.loads(os.read(descriptor, 4096) or b"{}")
        except ValueError:
            record = {}
        if not isinstance(record, dict) or not record:  # killed while claiming: the lock says no one holds it
            return locked is True
        if record.get("host") != socket.gethostname():
            return False
        return locked is True or not process_alive(int(record.get("pid", 0)))
    finally:
        os.close(descriptor)


def remove_abandoned_staging(output_dir: Path) -> list[Path]:
    """Remove the staging folders in ``output_dir`` that runs killed outright (SIGKILL, out of memory, a lost
    container) left behind; those of live runs are kept. The folders removed."""
    removed = []
    try:
        entries = [entry for entry in os.scandir(output_dir) if entry.is_dir(follow_symlinks=False)]
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith((STAGING_PREFIX, CLAIMING_PREFIX)):
            continue
        folder = Path(entry.path)
        if _abandoned(folder):
            shutil.rmtree(folder, ignore_errors=True)
            logger.info(f"{output_dir}: removed {folder.name}, the unfinished outputs of a run that was killed")
            removed.append(folder)
    return removed


@contextmanager
def staged_outputs(output_dir: str | os.PathLike) -> Iterator[Path]:
    """A fresh staging folder inside ``output_dir``; its files move into ``output_dir`` only if the block succeeds.

    On an exception the staging folder is removed and ``output_dir`` is left as it was. The files are published
    without replacing anything (:func:`publish_staged`): a file of the same name that appeared meanwhile (another
    run given the same output folder, after this run's check of it) is kept, and this run's files are withdrawn.
    The staging folder records its owner and is locked while the run lives, so that the next run into the folder
    removes a staging folder that a killed run left (:func:`remove_abandoned_staging`), never a live run's.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(output_dir)
    staging, owner = _claim_staging(output_dir)
    try:
        yield staging
        publish_staged(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        os.close(owner)  # after the removal: the folder is never seen unowned while it exists


def _place(source: Path, target: Path) -> None:
    """``source`` under the name ``target``, never replacing a file there: a hard link fails on an existing name in
    one step; where the file system has no hard links, a rename after a check (a narrow window)."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some network and FAT file systems)
        if target.exists():
            raise FileExistsError(errno.EEXIST, "exists", str(target)) from None
        os.replace(source, target)


def publish_staged(staging: Path, output_dir: Path) -> None:
    """Move the files of ``staging`` into ``output_dir`` (same relative paths), all or none.

    ``output_dir`` was empty (hidden entries aside) when the run started (:func:`..apps.check_paths`); results that
    appeared there since belong to another run given the same folder, and mixing both under one summary would
    misreport either. So the files are placed without replacing any, and on any failure the ones this run placed,
    and the folders it made for them, are removed again: the folder ends with one run's complete results.

    Raises:
        DataError: naming the output folder, or the file another run wrote meanwhile.
    """
    from clinseg.pipelines.paths import earlier_results

    earlier, shown = earlier_results(output_dir)
    if earlier:
        raise DataError(output_dir, f"the output folder received another run's results while this run ran ({shown})"
                        "; this run's results are not written beside them.", "Give each run its own output folder "
                        "(-o).")  # fmt: skip
    placed: list[Path] = []
    made: list[Path] = []
    try:
        for path in sorted(staging.rglob("*")):
            if path == staging / OWNER_FILE:  # the staging folder's own record, not a result
                continue
            target = output_dir / path.relative_to(staging)
            try:
                if path.is_dir():
                    if not target.is_dir():
                        target.mkdir()
                        made.append(target)
                    continue
                _place(path, target)
            except FileExistsError:
                raise DataError(target, "was written by another run given the same output folder while this run ran"
                                "; it is kept, and this run's results are withdrawn.", "Give each run its own "
                                "output folder (-o).") from None  # fmt: skip
            placed.append(target)
    except BaseException:
        for target in reversed(placed):
            target.unlink(missing_ok=True)
        for folder in reversed(made):
            try:
                folder.rmdir()
            except OSError:  # another run's files are in it
                pass
        raise
