"""The input matrix of issue 13: classes of unusual or bad inputs, each written as real files and run through a bundle
as a user runs it, with one verdict per class.

    python -m clinseg.pipelines.benchmarks.input_matrix [--out data/benchmarks/input_matrix.json] [--cases ID ...]
        [--repo PATH] [--keep]

Verdicts:

- ``correct``: the run ended and its result is right, checked against an expectation computed here from what was
  written (distinct grey levels, a marker's position, the written mask, the number of result sets, ...);
- ``refused``: a one-line input error naming the file (in-process: a ``clinseg`` ``InputError`` in the exception
  chain, as :func:`clinseg.pipelines.cli.find_input_error` finds it; as a subprocess: a non-zero exit status, no
  ``Traceback`` and an ``error:`` line naming the file);
- ``WRONG``: the run ended with a plausible but wrong result;
- ``traceback``: a raw exception.

Reader cases drive the bundle's own config in-process (``monai.bundle.ConfigParser`` on
``<repo>/bundles/<bundle>/configs/{inference,train}.json``: its ``datalist`` and ``preprocessing``, or
``train#datalist`` and ``validate#preprocessing``); run cases start
``python -m monai.bundle run inferring|training`` with a tiny untrained checkpoint (``network_def#channels [4, 8]``,
``network_def#strides [2]``) under a temporary ``--bundle_root``, and report wall time and peak resident memory of
that process.

The script imports only ``clinseg.pipelines.cli`` and ``clinseg.datasets.errors`` from the project, so it runs against
an older checkout too, to compare before and after: make ``clinseg`` resolve to that checkout (``PYTHONPATH`` first;
subprocesses inherit it) and pass ``--repo`` so its configs are read::

    git worktree add /tmp/before <commit>
    PYTHONPATH=<a shim whose clinseg/ maps onto /tmp/before> \
        python pipelines/benchmarks/input_matrix.py --repo /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

TINY_NET = {"network_def#channels": [4, 8], "network_def#strides": [2]}
RUN_ARGS = {  # per bundle: the tiny network and small windows, passed to every subprocess run
    "vessels": {**TINY_NET, "sw_roi_size": [32, 32]},
    "oct_layers": {**TINY_NET, "image_size": [32, 48]},
    "ct_heart": {**TINY_NET, "patch_size": [16, 16, 16], "sw_batch_size": 1},
}
SUBPROCESS_TIMEOUT_S = 300
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)(: |$)")


class Outcome(Exception):  # noqa: N818 - a verdict reached inside a case, not an error
    def __init__(self, verdict: str, detail: str):
        super().__init__(detail)
        self.verdict, self.detail = verdict, detail


@dataclass
class Result:
    case: str
    input_class: str
    bundle: str
    verdict: str
    detail: str
    seconds: float
    runs: list = field(default_factory=list)


@dataclass
class Run:
    """One ``python -m monai.bundle run`` subprocess."""

    rc: int
    seconds: float
    peak_mib: float
    stdout: str
    stderr: str
    command: list

    def error_line(self) -> str:
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        return errors[-1] if errors else (lines[-1] if lines else "")

    def summary(self) -> dict:
        return {"rc": self.rc, "seconds": round(self.seconds, 2), "peak_mib": round(self.peak_mib, 1)}


# ---------------------------------------------------------------- context: repo, folders, checkpoints
class Context:
    def __init__(self, repo: Path, work: Path):
        self.repo, self.work = repo, work
        self.env = {k: v for k, v in os.environ.items() if k != "PIPELINE_TRACEBACK"}
        self.env.update(
            MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlruns' / 'mlflow.db'}",
            CUDA_VISIBLE_DEVICES="",
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        (work / "mlruns").mkdir(parents=True, exist_ok=True)
        self.bundle_roots: dict[str, Path] = {}

    def config(self, bundle: str, name: str = "inference.json") -> Path:
        return self.repo / "bundles" / bundle / "configs" / name

    def bundle_root(self, bundle: str) -> Path:
        """A temporary bundle root holding an untrained tiny checkpoint (``models/model.pt``) of ``bundle``."""
        if bundle not in self.bundle_roots:
            import torch

            root = self.work / "bundle_roots" / bundle
            (root / "models").mkdir(parents=True, exist_ok=True)
            parser = parse(self, bundle, "inference.json", TINY_NET)
            network = parser.get_parsed_content("network_def")
            state = network.state_dict()
            if bundle == "ct_heart":  # biased to the foreground, so that volumes are not trivially 0
                num_classes = int(parser.get_parsed_content("num_classes"))
                for key, value in state.items():
                    if key.endswith("bias") and tuple(value.shape) == (num_classes,):
                        state[key] = torch.tensor([-20.0] + [20.0] * (num_classes - 1))
            torch.save(state, root / "models" / "model.pt")
            self.bundle_roots[bundle] = root
        return self.bundle_roots[bundle]

    def folder(self, name: str) -> Path:
        path = self.work / "cases" / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def parse(ctx: Context, bundle: str, config: str, overrides: dict | None = None):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ctx.config(bundle, config)))
    parser["bundle_root"] = str(ctx.work / "bundle_roots" / bundle)
    parser.update(overrides or {})
    return parser


def input_error_type() -> tuple[type, ...]:
    from clinseg.datasets.errors import InputError

    return (InputError,)


def in_process(call: Callable[[], object], names: str | list[str]):
    """``call()``; an input error becomes a ``refused`` outcome, any other exception a ``traceback`` outcome."""
    try:
        return call()
    except Exception as e:
        from clinseg.pipelines.cli import find_input_error

        found = find_input_error(e, input_error_type())
        if found is not None:
            raise refused(str(found).splitlines()[0], names) from e
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        raise Outcome("traceback", last[:300]) from e


def refused(line: str, names: str | list[str]) -> Outcome:
    names = [names] if isinstance(names, str) else names
    named = any(name in line for name in names)
    return Outcome("refused", line[:300] + ("" if named else f"  [does not name {' or '.join(names)}]"))


def run_bundle(ctx: Context, bundle: str, workflow: str, config: str, args: dict) -> Run:
    """``python -m monai.bundle run <workflow>`` as a user types it, with the bundle's tiny checkpoint; its wall time
    and peak resident memory (``wait4``) are measured."""
    root = ctx.bundle_root(bundle)
    command = [sys.executable, "-m", "monai.bundle", "run", workflow, "--config_file", str(ctx.config(bundle, config))]
    command += ["--bundle_root", str(root)]
    for key, value in {**RUN_ARGS[bundle], **args}.items():
        command += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    logs = ctx.work / "logs"
    logs.mkdir(exist_ok=True)
    stamp = f"{len(list(logs.iterdir()))}"
    out_path, err_path = logs / f"{stamp}.out", logs / f"{stamp}.err"
    start = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        process = subprocess.Popen(command, cwd=ctx.repo, env=ctx.env, stdout=out, stderr=err, start_new_session=True)
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > SUBPROCESS_TIMEOUT_S:
                os.killpg(process.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.05)
    process.returncode = os.waitstatus_to_exitcode(status)
    return Run(
        process.returncode,
        time.perf_counter() - start,
        usage.ru_maxrss / 1024,
        out_path.read_text(errors="replace"),
        err_path.read_text(errors="replace"),
        command,
    )


def failed_run(run: Run, names: str | list[str]) -> Outcome:
    """The verdict of a run that exited non-zero: ``traceback`` if one was printed, else ``refused``."""
    if "Traceback" in run.stderr:
        lines = [line.strip() for line in run.stderr.splitlines() if line.strip()]
        raised = [line for line in lines if EXCEPTION_LINE.match(line)]  # the first is the root cause
        text = raised[0][:200] + (f" ... -> {raised[-1][:120]}" if len(raised) > 1 else "") if raised else lines[-1]
        return Outcome("traceback", f"exit {run.rc}: {text}")
    if run.rc < 0 or run.rc == 137:
        return Outcome("traceback", f"killed (exit {run.rc}) after {run.seconds:.0f} s")
    return refused(run.error_line(), names)


def result_sets(folder: Path) -> list[dict]:
    """The per-input JSON summaries the results writers leave in ``folder``."""
    found = []
    for path in sorted(folder.glob("*.json")):
        if path.name in ("inference_summary.json", "metrics.json"):
            continue
        try:
            found.append({"file": path.name, **json.loads(path.read_text())})
        except (OSError, ValueError):
            continue
    return found


# ---------------------------------------------------------------- writers of the input files
def save_png16(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(array.astype(np.uint16)).save(path)
    return path


def save_palette(path: Path, indices: np.ndarray, palette: list[tuple[int, int, int]]) -> Path:
    from PIL import Image

    image = Image.frombytes("P", (indices.shape[1], indices.shape[0]), indices.astype(np.uint8).tobytes())
    flat = [c for colour in palette for c in colour]
    image.putpalette(flat + [0] * (768 - len(flat)))
    image.save(path, optimize=False)
    return path


def save_rgb(path: Path, array: np.ndarray, **kwargs) -> Path:
    from PIL import Image

    Image.fromarray(array.astype(np.uint8)).save(path, **kwargs)
    return path


def photo(shape=(40, 36), seed=0) -> np.ndarray:
    """An 8-bit RGB photograph-like image (reddish background, darker lines, noise)."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    image = np.zeros((rows, cols, 3), np.float32)
    image[..., 0], image[..., 1], image[..., 2] = 170, 90, 40
    image[rows // 2 - 1 : rows // 2 + 1, :, 1] = 40
    image[:, cols // 3, 1] = 40
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def vessel_truth(shape=(40, 36)) -> np.ndarray:
    truth = np.zeros(shape, bool)
    truth[shape[0] // 2 - 1 : shape[0] // 2 + 1, :] = True
    truth[:, shape[1] // 3] = True
    return truth


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A valid 8-bit grey PNG of ``side`` x ``side`` zeros, compressed by hand (a few hundred KB on disk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte 0, then the row's zeros
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


PIXDIM_OFFSET = 76  # bytes into a NIfTI-1 header: pixdim, 8 float32


def ct_volume(shape=(24, 24, 16), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    volume = rng.integers(-1000, -700, size=shape).astype(np.int16)
    volume[6:18, 6:18, 4:12] = 40
    return volume


def nifti(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), codes: tuple[int, int] = (1, 1)) -> Path:
    import nibabel as nib

    image = nib.Nifti1Image(array, np.diag([*spacing, 1.0]))
    image.set_qform(image.affine if codes[0] else None, code=codes[0])
    image.set_sform(image.affine if codes[1] else None, code=codes[1])
    nib.save(image, path)
    return path


def nifti_raw_pixdim(path: Path, array: np.ndarray, axis: int, value: float) -> Path:
    """A qform-only NIfTI whose pixdim[axis + 1] is ``value`` in the header bytes (nibabel repairs 0 on save)."""
    nifti(path, array, (2.0, 3.0, 4.0), codes=(1, 0))
    raw = bytearray(path.read_bytes())
    offset = PIXDIM_OFFSET + 4 * (axis + 1)
    raw[offset : offset + 4] = struct.pack("<f", value)
    path.write_bytes(bytes(raw))
    return path


# ---------------------------------------------------------------- checks shared by the cases
def preprocess_inference(ctx: Context, bundle: str, input_path: Path, overrides: dict | None = None) -> list[dict]:
    """The bundle's inference ``datalist`` of ``input_path`` and each item through its ``preprocessing``."""
    key = "input_path" if bundle == "ct_heart" else "input_dir"

    def call():
        parser = parse(ctx, bundle, "inference.json", {key: str(input_path), **(overrides or {})})
        datalist = parser.get_parsed_content("datalist")
        preprocessing = parser.get_parsed_content("preprocessing")
        return [preprocessing(dict(item)) for item in datalist]

    return in_process(call, input_path.name)


def preprocess_training(ctx: Context, dataset_dir: Path, names: list[str], overrides: dict | None = None):
    """The vessels ``train#datalist`` of ``dataset_dir`` (one image: all training) through
    ``validate#preprocessing`` (the deterministic part of the training transforms)."""

    def call():
        parser = parse(ctx, "vessels", "train.json", {"dataset_dir": str(dataset_dir), **(overrides or {})})
        datalist = parser.get_parsed_content("train#datalist")
        preprocessing = parser.get_parsed_content("validate#preprocessing")
        return [preprocessing(dict(item)) for item in datalist]

    return in_process(call, names)


def as_array(value) -> np.ndarray:
    import torch

    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def levels_verdict(pre: np.ndarray, original: np.ndarray, what: str) -> tuple[str, str]:
    """``correct`` if the preprocessed image keeps the written image's distinct levels (at least 90 %) and their
    order (non-decreasing in the written values, ties only where a percentile clip applies)."""
    pre, original = pre.reshape(-1).astype(np.float64), original.reshape(-1).astype(np.float64)
    written = len(np.unique(original))
    kept = len(np.unique(np.round(pre, 6)))
    order = np.argsort(original, kind="stable")
    monotone = bool(np.all(np.diff(pre[order]) >= -1e-5 * max(1.0, float(np.abs(pre).max()))))
    detail = f"{kept} distinct levels after preprocessing ({what}: {written} written), order kept: {monotone}"
    return ("correct" if kept >= 0.9 * written and monotone else "WRONG"), detail


def outputs_verdict(run: Run, output_dir: Path, n_inputs: int, names: list[str]) -> tuple[str, str]:
    """Same-stem inputs: ``correct`` when each input has its own result set."""
    sets = result_sets(output_dir)
    written = f"{len(sets)} result sets for {n_inputs} inputs ({', '.join(s['file'] for s in sets)})"
    if run.rc != 0:
        outcome = failed_run(run, names)
        return outcome.verdict, f"{outcome.detail} | {written}"
    claim = [line.strip() for line in run.stdout.splitlines() if "wrote" in line.lower() or "written" in line.lower()]
    said = f"; run says: {claim[-1].split(' to ')[0][:90]}" if claim else ""
    sources = {str(s.get("source", s["file"])) for s in sets}
    verdict = "correct" if len(sets) == n_inputs and len(sources) == n_inputs else "WRONG"
    return verdict, written + said


# ---------------------------------------------------------------- the cases
CASES: list[tuple[str, str, str, Callable]] = []


def case(case_id: str, input_class: str, bundle: str):
    def register(function):
        CASES.append((case_id, input_class, bundle, function))
        return function

    return register


@case("tiff16_rgb_12bit", "16-bit RGB TIFF, 12-bit camera data (0..4095)", "vessels")
def tiff16_rgb_12bit(ctx, folder):
    import tifffile

    rows, cols = 40, 36
    green = (np.arange(rows * cols) * 4095 // (rows * cols - 1)).reshape(rows, cols).astype(np.uint16)
    image = np.stack([np.full_like(green, 3000), green, np.full_like(green, 600)], -1)
    tifffile.imwrite(folder / "cam.tif", image, photometric="rgb")
    item = preprocess_inference(ctx, "vessels", folder)[0]
    return levels_verdict(as_array(item["image"])[0], green, "green channel")


@case("png16_grey_oct", "16-bit grey PNG B-scan, values 0..60000", "oct_layers")
def png16_grey_oct(ctx, folder):
    rows, cols = 64, 96
    values = (np.arange(rows * cols) * 60000 // (rows * cols - 1)).reshape(rows, cols)
    save_png16(folder / "bscan.png", values)
    item = preprocess_inference(ctx, "oct_layers", folder, {"image_size": [rows, cols]})[0]
    return levels_verdict(as_array(item["image"])[0], values, "grey")


@case("png16_grey_photo", "16-bit grey PNG photograph, values 0..60000", "vessels")
def png16_grey_photo(ctx, folder):
    rows, cols = 40, 36
    values = (np.arange(rows * cols) * 60000 // (rows * cols - 1)).reshape(rows, cols)
    save_png16(folder / "grey16.png", values)
    item = preprocess_inference(ctx, "vessels", folder)[0]
    return levels_verdict(as_array(item["image"])[0], values, "grey")


def exif_case(ctx, folder, shape):
    """A JPEG stored rotated with EXIF orientation 6 and its mask upright as displayed; a white marker in the
    displayed top-left corner must land on the mask's marked spot."""
    from PIL import Image

    rows, cols = shape
    displayed = np.full((rows, cols, 3), 80, np.uint8)
    displayed[3:9, 3:9] = 255
    mask = np.zeros((rows, cols), np.uint8)
    mask[3:9, 3:9] = 255
    stored = np.rot90(displayed, 1)  # orientation 6: rotate 90 degrees clockwise to display
    (folder / "images").mkdir()
    (folder / "masks").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    save_rgb(folder / "images" / "p.jpg", stored, exif=exif.tobytes(), quality=95)
    save_rgb(folder / "masks" / "p.png", mask)
    item = preprocess_training(ctx, folder, ["p.jpg", "p.png"], {"patch_size": [16, 16]})[0]
    image, label = as_array(item["image"])[0], as_array(item["label"])[0]
    if image.shape != label.shape:
        return "WRONG", f"image {image.shape} and mask {label.shape} differ in shape"
    bright = np.argwhere(image >= np.sort(image.reshape(-1))[-36])
    marker = bright.mean(0)
    spot = np.argwhere(label == 1).mean(0)
    aligned = np.abs(marker - 6.0).max() <= 2 and np.abs(spot - 6.0).max() <= 2
    detail = (
        f"shape {image.shape}; marker in the image at (row, col) ({marker[0]:.1f}, {marker[1]:.1f}), "
        f"in the mask at ({spot[0]:.1f}, {spot[1]:.1f}); expected (6, 6)"
    )
    return ("correct" if aligned else "WRONG"), detail


@case("jpeg_exif6_square", "JPEG with EXIF orientation 6 + upright PNG mask, 40x40", "vessels")
def jpeg_exif6_square(ctx, folder):
    return exif_case(ctx, folder, (40, 40))


@case("jpeg_exif6_oblong", "JPEG with EXIF orientation 6 + upright PNG mask, 40x36", "vessels")
def jpeg_exif6_oblong(ctx, folder):
    return exif_case(ctx, folder, (40, 36))


def mask_case(ctx, folder, write_mask: Callable[[Path, np.ndarray], Path], truth: np.ndarray):
    (folder / "images").mkdir()
    (folder / "masks").mkdir()
    save_rgb(folder / "images" / "f.png", photo(truth.shape))
    mask_path = write_mask(folder / "masks", truth)
    item = preprocess_training(ctx, folder, [mask_path.name], {"patch_size": [16, 16]})[0]
    label = as_array(item["label"])[0]
    if label.shape != truth.shape:
        return "WRONG", f"label {label.shape}, written {truth.shape}"
    wrong = int((label.astype(np.int64) != truth.astype(np.int64)).sum())
    values = sorted(int(v) for v in np.unique(label))
    detail = f"label values {values}; {wrong} of {truth.size} pixels differ from the written mask"
    return ("correct" if wrong == 0 else "WRONG"), detail


@case("mask16_0_65535", "16-bit mask 0/65535 (PNG)", "vessels")
def mask16(ctx, folder):
    return mask_case(ctx, folder, lambda d, t: save_png16(d / "f.png", t * 65535), vessel_truth())


@case("mask16_0_1", "16-bit mask 0/1 (PNG)", "vessels")
def mask16_01(ctx, folder):
    return mask_case(ctx, folder, lambda d, t: save_png16(d / "f.png", t * 1), vessel_truth())


@case("mask_gif_3_253", "palette GIF mask, indices 0/1 = grey 3/253 (DRIVE)", "vessels")
def mask_gif(ctx, folder):
    return mask_case(
        ctx, folder, lambda d, t: save_palette(d / "f.gif", t, [(3, 3, 3), (253, 253, 253)]), vessel_truth()
    )


@case("mask_gif_inverted_palette", "palette GIF mask, index 0 = grey 253 (vessel), 1 = grey 3", "vessels")
def mask_gif_inverted(ctx, folder):
    return mask_case(
        ctx, folder, lambda d, t: save_palette(d / "f.gif", 1 - t, [(253, 253, 253), (3, 3, 3)]), vessel_truth()
    )


@case("mask_3_values", "mask with 3 values 0/128/255", "vessels")
def mask_three(ctx, folder):
    def write(d, t):
        array = t.astype(np.uint8) * 255
        array[:4, :4] = 128
        return save_rgb(d / "f.png", array)

    verdict, detail = mask_case(ctx, folder, write, vessel_truth())
    return ("WRONG" if verdict == "correct" else verdict), f"ran (expected refused): {detail}"


def bomb_case(ctx, folder, bundle):
    bomb_png(folder / "bomb.png")
    size_kb = (folder / "bomb.png").stat().st_size / 1024
    run = run_bundle(
        ctx,
        bundle,
        "inferring",
        "inference.json",
        {"input_dir": str(folder), "output_dir": str(folder.parent / f"{folder.name}-out")},
    )
    memory = f"{run.seconds:.1f} s, peak {run.peak_mib:.0f} MiB; 20000 x 20000 PNG of {size_kb:.0f} KB"
    if run.rc == 0:
        return "WRONG", f"ran: {memory}", [run]
    outcome = failed_run(run, "bomb.png")
    return outcome.verdict, f"{outcome.detail} | {memory}", [run]


@case("bomb_png_vessels", "decompression-bomb PNG (20000 x 20000 zeros)", "vessels")
def bomb_vessels(ctx, folder):
    return bomb_case(ctx, folder, "vessels")


@case("bomb_png_oct", "decompression-bomb PNG (20000 x 20000 zeros)", "oct_layers")
def bomb_oct(ctx, folder):
    return bomb_case(ctx, folder, "oct_layers")


@case("patch_larger_than_image", "training patch [128, 128] on 40 x 36 images", "vessels")
def patch_too_large(ctx, folder):
    dataset = folder / "data"
    (dataset / "images").mkdir(parents=True)
    (dataset / "masks").mkdir()
    for index in range(2):
        save_rgb(dataset / "images" / f"i{index}.png", photo(seed=index))
        save_rgb(dataset / "masks" / f"i{index}.png", vessel_truth().astype(np.uint8) * 255)
    args = {
        "dataset_dir": str(dataset),
        "output_dir": str(folder / "out"),
        "patch_size": [128, 128],
        "patches_per_image": 2,
        "repeats_per_epoch": 1,
        "train#trainer#max_epochs": 1,
        "val_interval": 1,
    }
    run = run_bundle(ctx, "vessels", "training", "train.json", args)
    timing = f"{run.seconds:.1f} s"
    if run.rc == 0:
        return "WRONG", f"trained to the end with patch_size [128, 128] on 40 x 36 images ({timing})", [run]
    outcome = failed_run(run, ["i0.png", "i1.png"])
    started = "Epoch" in run.stderr or "Epoch" in run.stdout or "epoch" in run.stderr
    return outcome.verdict, f"{outcome.detail} | {timing}{', after training started' if started else ''}", [run]


def ct_case(ctx, folder, names, extra=None, check=None):
    """ct_heart inference of ``folder/in`` into ``folder/out``; ``check(run, out)`` judges a run that ended."""
    out = folder / "out"
    run = run_bundle(
        ctx,
        "ct_heart",
        "inferring",
        "inference.json",
        {"input_path": str(folder / "in"), "output_dir": str(out), **(extra or {})},
    )
    if run.rc != 0:
        outcome = failed_run(run, names)
        return outcome.verdict, f"{outcome.detail} ({run.seconds:.1f} s)", [run]
    verdict, detail = check(run, out)
    return verdict, f"{detail} ({run.seconds:.1f} s)", [run]


def volume_report(out: Path) -> str:
    sets = result_sets(out)
    if not sets:
        return "no result written"
    first = sets[0]
    return f"reported {first.get('volume_ml')} mL at spacing {first.get('spacing_mm')} mm"


@case("nifti_no_geometry", "NIfTI, qform_code = sform_code = 0, pixdim 1", "ct_heart")
def nifti_no_geometry(ctx, folder):
    (folder / "in").mkdir()
    nifti(folder / "in" / "a.nii", ct_volume(), codes=(0, 0))

    def check(run, out):
        sets = result_sets(out)
        assumed = any("geometry_assumed" in s for s in sets)
        warned = "assum" in (run.stderr + run.stdout).lower()
        return (
            "WRONG",
            f"ran with geometry assumed silently: {volume_report(out)}; recorded: {assumed}, warned: {warned}",
        )

    return ct_case(ctx, folder, "a.nii", check=check)


@case("nifti_no_geometry_assume_spacing", "NIfTI without geometry + --assume_spacing [0.8, 0.8, 2.0]", "ct_heart")
def nifti_no_geometry_assumed(ctx, folder):
    import nibabel as nib

    (folder / "in").mkdir()
    nifti(folder / "in" / "a.nii", ct_volume(), codes=(0, 0))
    spacing = [0.8, 0.8, 2.0]

    def check(run, out):
        sets = result_sets(out)
        masks = sorted(out.glob("*_seg.nii.gz"))
        if len(sets) != 1 or len(masks) != 1:
            return "WRONG", f"{len(sets)} summaries, {len(masks)} masks written"
        summary = sets[0]
        voxels = int((np.asarray(nib.load(masks[0]).dataobj) == 1).sum())
        expected = round(voxels * float(np.prod(spacing)) / 1000.0, 3)
        reported = (summary.get("segmented_volume_ml") or summary.get("volume_ml") or {}).get("heart")
        recorded = "geometry_assumed" in summary
        ok = recorded and reported is not None and abs(reported - expected) <= 1e-3 + 1e-6 * expected
        detail = f"heart {reported} mL, expected {expected} mL ({voxels} voxels x {spacing} mm); recorded: {recorded}"
        return ("correct" if ok else "WRONG"), detail

    return ct_case(ctx, folder, ["a.nii", "assume_spacing"], {"assume_spacing": spacing}, check)


def degenerate_case(ctx, folder, value):
    (folder / "in").mkdir()
    nifti_raw_pixdim(folder / "in" / "a.nii", ct_volume(), axis=0, value=value)

    def check(run, out):
        return "WRONG", f"ran with pixdim[1] = {value}: {volume_report(out)}"

    return ct_case(ctx, folder, "a.nii", check=check)


@case("nifti_pixdim_zero", "NIfTI (qform only) with pixdim[1] = 0", "ct_heart")
def nifti_pixdim_zero(ctx, folder):
    return degenerate_case(ctx, folder, 0.0)


@case("nifti_pixdim_nan", "NIfTI (qform only) with pixdim[1] = NaN", "ct_heart")
def nifti_pixdim_nan(ctx, folder):
    return degenerate_case(ctx, folder, float("nan"))


def same_stem_2d(ctx, folder, bundle):
    import tifffile

    inputs = folder / "in"
    inputs.mkdir()
    grey = photo((40, 36))[..., 1]
    if bundle == "vessels":
        save_rgb(inputs / "b0.png", photo((40, 36), seed=1))
        tifffile.imwrite(inputs / "b0.tif", photo((40, 36), seed=2), photometric="rgb")
    else:
        save_rgb(inputs / "b0.png", grey)
        tifffile.imwrite(inputs / "b0.tif", 255 - grey)
    out = folder / "out"
    run = run_bundle(ctx, bundle, "inferring", "inference.json", {"input_dir": str(inputs), "output_dir": str(out)})
    verdict, detail = outputs_verdict(run, out, 2, ["b0.png", "b0.tif"])
    return verdict, f"{detail} ({run.seconds:.1f} s)", [run]


@case("same_stem_png_tif_oct", "same stem in one folder: b0.png + b0.tif", "oct_layers")
def same_stem_oct(ctx, folder):
    return same_stem_2d(ctx, folder, "oct_layers")


@case("same_stem_png_tif_vessels", "same stem in one folder: b0.png + b0.tif", "vessels")
def same_stem_vessels(ctx, folder):
    return same_stem_2d(ctx, folder, "vessels")


@case("same_stem_nii_nrrd", "same stem in one folder: a.nii.gz + a.nrrd", "ct_heart")
def same_stem_ct(ctx, folder):
    import SimpleITK as sitk

    inputs = folder / "in"
    inputs.mkdir()
    nifti(inputs / "a.nii.gz", ct_volume(seed=1))
    image = sitk.GetImageFromArray(np.ascontiguousarray(ct_volume(seed=2).transpose(2, 1, 0)))
    image.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(image, str(inputs / "a.nrrd"))
    out = folder / "out"
    run = run_bundle(
        ctx, "ct_heart", "inferring", "inference.json", {"input_path": str(inputs), "output_dir": str(out)}
    )
    verdict, detail = outputs_verdict(run, out, 2, ["a.nii.gz", "a.nrrd"])
    return verdict, f"{detail} ({run.seconds:.1f} s)", [run]


def output_in_input_case(ctx, folder, bundle, write_inputs, key):
    """``output_dir`` equal to the input folder: refused, or run twice to see whether the second run reads the
    first one's results as inputs."""
    inputs = folder / "in"
    inputs.mkdir()
    names = write_inputs(inputs)
    runs = []
    for _ in range(2):
        run = run_bundle(ctx, bundle, "inferring", "inference.json", {key: str(inputs), "output_dir": str(inputs)})
        runs.append(run)
        if run.rc != 0:
            outcome = failed_run(run, [str(inputs), inputs.name])
            when = "first" if len(runs) == 1 else "second"
            return outcome.verdict, f"{when} run: {outcome.detail}", runs
        if len(runs) == 1:
            after_first = len(result_sets(inputs))
    after_second = len(result_sets(inputs))
    if after_second > after_first:
        detail = (
            f"ran; the second run read the first one's outputs as inputs: {after_first} result sets after run 1, "
            f"{after_second} after run 2 (inputs: {', '.join(names)})"
        )
        return "WRONG", detail, runs
    return "WRONG", f"ran with the outputs in the input folder ({after_first} then {after_second} result sets)", runs


@case("output_dir_is_input_dir_vessels", "output_dir = the input folder", "vessels")
def output_in_input_vessels(ctx, folder):
    def write(inputs):
        save_rgb(inputs / "p.png", photo())
        return ["p.png"]

    return output_in_input_case(ctx, folder, "vessels", write, "input_dir")


@case("output_dir_is_input_dir_ct", "output_dir = the input folder", "ct_heart")
def output_in_input_ct(ctx, folder):
    def write(inputs):
        nifti(inputs / "a.nii.gz", ct_volume())
        return ["a.nii.gz"]

    return output_in_input_case(ctx, folder, "ct_heart", write, "input_path")


def non_data_case(ctx, folder, bundle):
    inputs = folder / "in"
    inputs.mkdir()
    save_rgb(inputs / "p1.png", photo(seed=1) if bundle == "vessels" else photo(seed=1)[..., 1])
    save_rgb(inputs / "p2.png", photo(seed=2) if bundle == "vessels" else photo(seed=2)[..., 1])
    (inputs / "README.txt").write_text("scans exported 2024-05-01\n")
    (inputs / "Thumbs.db").write_bytes(os.urandom(512))
    out = folder / "out"
    run = run_bundle(ctx, bundle, "inferring", "inference.json", {"input_dir": str(inputs), "output_dir": str(out)})
    if run.rc != 0:
        outcome = failed_run(run, ["README.txt", "Thumbs.db"])
        return outcome.verdict, f"{outcome.detail} ({run.seconds:.1f} s)", [run]
    sets = result_sets(out)
    noted = "README.txt" in run.stderr + run.stdout
    how = "skipped with a note" if noted else "skipped silently (no note)"
    detail = f"{len(sets)} result sets for 2 images; README.txt / Thumbs.db {how}"
    return ("correct" if len(sets) == 2 else "WRONG"), f"{detail} ({run.seconds:.1f} s)", [run]


@case("non_data_files_vessels", "README.txt + Thumbs.db beside the images", "vessels")
def non_data_vessels(ctx, folder):
    return non_data_case(ctx, folder, "vessels")


@case("non_data_files_oct", "README.txt + Thumbs.db beside the images", "oct_layers")
def non_data_oct(ctx, folder):
    return non_data_case(ctx, folder, "oct_layers")


def must_refuse(items: list[dict], what: str) -> tuple[str, str]:
    image = as_array(items[0]["image"])
    return "WRONG", f"ran (expected refused): {what}; image {image.shape}, finite: {bool(np.isfinite(image).all())}"


@case("tiff_3_pages_oct", "3-page TIFF where one image is expected", "oct_layers")
def tiff_pages_oct(ctx, folder):
    import tifffile

    pages = np.stack([photo()[..., 1] + k for k in range(3)])
    tifffile.imwrite(folder / "stack.tif", pages, photometric="minisblack")  # 3 pages of (40, 36)
    return must_refuse(preprocess_inference(ctx, "oct_layers", folder, {"image_size": [40, 36]}), "page 1 of 3 read")


@case("tiff_3_pages_vessels", "3-page TIFF where one image is expected", "vessels")
def tiff_pages_vessels(ctx, folder):
    import tifffile

    pages = np.stack([photo(seed=k) for k in range(3)])
    tifffile.imwrite(folder / "stack.tif", pages, photometric="rgb")
    return must_refuse(preprocess_inference(ctx, "vessels", folder), "page 1 of 3 read")


@case("float_tiff_nan", "float32 TIFF with NaN", "oct_layers")
def float_nan(ctx, folder):
    import tifffile

    array = photo()[..., 1].astype(np.float32)
    array[5:9, 5:9] = np.nan
    tifffile.imwrite(folder / "nan.tif", array)
    return must_refuse(preprocess_inference(ctx, "oct_layers", folder, {"image_size": [40, 36]}), "NaN read as data")


# ---------------------------------------------------------------- driver
def run_case(ctx: Context, case_id: str, input_class: str, bundle: str, function: Callable) -> Result:
    start = time.perf_counter()
    runs: list[Run] = []
    try:
        answer = function(ctx, ctx.folder(case_id))
        verdict, detail = answer[0], answer[1]
        runs = answer[2] if len(answer) > 2 else []
    except Outcome as outcome:
        verdict, detail = outcome.verdict, outcome.detail
    except Exception as e:  # a fault of this script, not of the bundle: recorded as such
        verdict = "harness-error"
        detail = traceback.format_exception_only(type(e), e)[-1].strip()[:300]
    result = Result(case_id, input_class, bundle, verdict, detail, round(time.perf_counter() - start, 2))
    result.runs = [{**run.summary(), "command": " ".join(run.command), "error_line": run.error_line()} for run in runs]
    return result


def table(results: list[Result]) -> str:
    rows = [("class", "bundle", "verdict", "detail")]
    rows += [(f"{r.case}: {r.input_class}", r.bundle, r.verdict, r.detail.replace("|", "/")) for r in results]
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|---|---|---|---|")
    return "\n".join(lines)


def git_commit(repo: Path) -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    import clinseg.pipelines

    default_repo = Path(clinseg.pipelines.__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=default_repo, help="checkout whose bundles/ configs are run")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default <repo>/data/benchmarks/...)")
    parser.add_argument("--cases", nargs="*", default=None, help="case ids to run (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    out = args.out or repo / "data" / "benchmarks" / "input_matrix.json"
    library = Path(clinseg.pipelines.__file__).resolve().parent.parent
    if library != repo:
        print(f"warning: clinseg is imported from {library}, configs are read from {repo}", file=sys.stderr)
    selected = [c for c in CASES if args.cases is None or c[0] in args.cases]
    unknown = set(args.cases or []) - {c[0] for c in CASES}
    if unknown:
        raise SystemExit(f"unknown case ids {sorted(unknown)}; known: {[c[0] for c in CASES]}")

    work = Path(tempfile.mkdtemp(prefix="input_matrix-"))
    ctx = Context(repo, work)
    results, start = [], time.perf_counter()
    try:
        for index, (case_id, input_class, bundle, function) in enumerate(selected, 1):
            print(f"[{index}/{len(selected)}] {case_id} ({bundle}) ...", flush=True)
            result = run_case(ctx, case_id, input_class, bundle, function)
            print(f"    {result.verdict}: {result.detail} [{result.seconds:.1f} s]", flush=True)
            results.append(result)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - start
    print()
    print(table(results))
    counts = {v: sum(r.verdict == v for r in results) for v in dict.fromkeys(r.verdict for r in results)}
    print(f"\n{len(results)} cases in {total:.0f} s: " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    report = {
        "repo": str(repo),
        "commit": git_commit(repo),
        "library": str(library),
        "python": platform.python_version(),
        "seconds": round(total, 1),
        "counts": counts,
        "results": [asdict(r) for r in results],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
