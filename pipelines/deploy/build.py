"""Build a self-contained MONAI Deploy application folder from a trained bundle.

    python -m clinseg.pipelines.deploy ct_heart --out deploy/ct_heart_app [--checkpoint PATH [PATH ...]] \\
        [--override KEY=JSON ...]

The folder holds everything the application needs and nothing of the repository around it:

- ``app.py`` and ``__main__.py``: the application (``python app.py -i IN -o OUT -m models/model.ts``, or
  ``python <folder> ...``, the entry point a MONAI Application Package runs);
- ``app.yaml``: the package manifest (title, version, input/output formats, resources);
- ``requirements.txt``: the pinned runtime packages (the SDK, Holoscan, torch, MONAI, DICOM and image I/O);
- ``models/model.ts``: the TorchScript export (metadata and inference config embedded), checked against the
  checkpoint's logits before it is written into the folder; with several ``--checkpoint`` files, the TorchScript
  model of their ensemble (the mean of their probabilities); or, with ``--model_format checkpoint``,
  ``models/model.pt``, which the app loads into ``network_def`` (the path that needs no TorchScript);
- ``bundle/inference.json`` (the bundle's inference config, includes expanded, overrides applied) and
  ``bundle/metadata.json``;
- ``clinseg/``: the project code the config refers to (``clinseg.pipelines``, ``clinseg.datasets``,
  ``clinseg.transforms``);
- ``series_rules.json`` (CT): the DICOM series selection rule, editable (the SDK's rule format);
- ``README.md``: how to run and package it.

Everything is checked before anything is written: the bundle, the checkpoint (it must fit the network the overrides
describe), the overrides (``KEY=JSON``, ids of the bundle's train or inference config, values of the kind the config
expects) and ``--out`` (new or empty). A problem is one line on stderr, ``error: <file, argument or config key>:
<problem>``, and exit status 1 (:func:`clinseg.pipelines.cli.report_error`); the folder is built under a temporary
name beside ``--out`` and renamed into place at the end, so a failed build leaves nothing behind (folders it created
for ``--out`` included).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

from clinseg.datasets.errors import DataError, InputError
from clinseg.datasets.io import staged_folder
from clinseg.pipelines.cli import ConfigError, entry_point
from clinseg.pipelines.deploy.apps import CommandLineParser, first_missing, remove_created
from clinseg.pipelines.deploy.runtime import CT_RULES
from clinseg.pipelines.paths import SOURCE_ROOT

PACKAGES = ("datasets", "transforms", "pipelines")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "benchmarks", "demo.py", "experiments.py")

APP_PY = '''"""MONAI Deploy application of the {bundle} bundle: {title}.

Run: python app.py -i INPUT -o OUTPUT -m {model}   (or set HOLOSCAN_INPUT_PATH, HOLOSCAN_OUTPUT_PATH,
HOLOSCAN_MODEL_PATH). See README.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the project code shipped beside this file

from clinseg.pipelines.deploy.apps import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main("{app_class}", Path(__file__).resolve().parent / "bundle" / "inference.json"))
'''

MAIN_PY = '''"""Entry point of the application folder (``python <folder>``), as a MONAI Application Package runs it."""

import runpy
from pathlib import Path

runpy.run_path(str(Path(__file__).resolve().parent / "app.py"), run_name="__main__")
'''

APP_YAML = """%YAML 1.2
---
application:
  title: {title}
  version: {version}
  inputFormats: ["file"]
  outputFormats: ["file"]
resources:
  cpu: 2
  gpu: 0
  memory: {memory}
  gpuMemory: 0Gi
"""

README = """# {title}: MONAI Deploy application

Built from the `{bundle}` bundle by `python -m clinseg.pipelines.deploy {bundle} --out <folder>`.

Input: {inputs}
Output: {outputs}

## Run locally (no Docker)

```bash
python -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -r requirements.txt
ulimit -s 32768   # Holoscan asks for a larger stack than the default 8 MB
.venv/bin/python app.py -i /path/to/input -o /path/to/output -m {model}
# or: HOLOSCAN_INPUT_PATH=... HOLOSCAN_OUTPUT_PATH=... HOLOSCAN_MODEL_PATH={model} .venv/bin/python app.py
```

Exit status 0 on success; 1 with one line naming the argument, file or folder and the reason when an argument or an
input is unusable (`error: <file or argument>: <problem>`), and then no result files are written (outputs are staged
and moved into place only at the end) and an output folder the run created is removed again.

## Package as a MONAI Application Package (needs Docker with buildx, and network access for the base image)

```bash
monai-deploy package . -c app.yaml -m {model} -t {bundle}-app:{version} --platform x86_64 -l DEBUG
monai-deploy run {bundle}-app-x64-workstation-dgpu-linux-amd64:{version} -i /path/to/input -o /path/to/output
```

`app.yaml` declares the resources (2 CPUs, {memory} memory, no GPU needed; a GPU is used when present).
"""

KINDS = {
    True: {
        "app_class": "CTHeartApp",
        "memory": "6Gi",
        "inputs": "a folder of DICOM files (one study; of the series `series_rules.json` matches, localizers are "
        "skipped and the one with the most slices is segmented; a tie is refused, naming the series).",
        "outputs": "`dicom_seg/<uid>.dcm` (DICOM Segmentation, heart = SNOMED CT 80891009, one frame per source "
        "slice, referencing the CT series), `series_seg.nii.gz` (mask in the series' patient space), "
        "`series.json` (heart volume in mL, voxels, spacing, series UID, the series chosen and skipped), "
        "`series_views.png`.",
    },
    False: {
        "app_class": "ImageSegmentationApp",
        "memory": "2Gi",
        "inputs": "a folder of images (PNG/TIFF/JPEG; for OCT also Duke `.mat` B-scans).",
        "outputs": "per image `<id>_seg.png` (label map), `<id>_overlay.png`, `<id>.json` (area fraction per class"
        "; vessels inside the field of view, estimated from the photograph when no mask is given and then written as "
        "`<id>_fov.png`; OCT: mean thickness per layer).",
    },
}


def expanded_config(bundle: str, checkpoints: list[Path], overrides: dict) -> dict:
    """The bundle's inference config (and metadata) with the overrides applied and the model's decision rule as a
    value, as one dictionary: what the TorchScript export carries too
    (:func:`clinseg.pipelines.export.embedded_config`)."""
    from clinseg.pipelines.export import embedded_config

    with warnings.catch_warnings():  # MONAI's note on the metadata's `optional_packages_version` name
        warnings.filterwarnings("ignore", message="Detected deprecated name")
        return embedded_config(bundle, checkpoints, overrides, with_metadata=True)


def bundle_root(bundle: str) -> Path:
    """The bundle's folder: a name under ``bundles/`` or a folder path; else an :class:`InputError` naming it."""
    root = Path(bundle) if os.sep in bundle or bundle.startswith(".") else SOURCE_ROOT / "bundles" / bundle
    if not (root / "configs" / "train.json").is_file() or not (root / "configs" / "inference.json").is_file():
        names = sorted(p.parent.parent.name for p in (SOURCE_ROOT / "bundles").glob("*/configs/inference.json"))
        raise InputError(bundle, f"is not a bundle of this project (no {root}/configs/train.json and inference.json)"
                         f"; the bundles: {', '.join(names)}, or a bundle folder.")  # fmt: skip
    return root.resolve()


def parse_overrides(items: list[str]) -> dict:
    """``KEY=JSON`` items (``network_def#channels=[8,16,32]``, ``name="text"``) as a dictionary."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--override {item}", "is not KEY=JSON (e.g. network_def#channels=[8,16,32]).")
        try:
            overrides[key] = json.loads(value)
        except ValueError as e:
            quote = f""" (a text is quoted: {key}='"{value}"')""" if value[:1].isalpha() else ""
            raise ConfigError(key, f"the value {value!r} is not JSON: {e}{quote}.") from None
    return overrides


def check_overrides(root: Path, overrides: dict) -> None:
    """Every override names an id of the bundle's train or inference config (those given at training are accepted)
    and has the kind of value the config expects (:mod:`clinseg.pipelines.config_checks`); one line each."""
    from monai.bundle import ConfigParser

    from clinseg.pipelines.config_checks import check_override_keys, check_values
    from clinseg.pipelines.export import bundle_config

    configs = root / "configs"
    try:
        check_override_keys([str(configs / "train.json"), str(configs / "inference.json")], overrides)
        defaults = ConfigParser.load_config_files(str(configs / "inference.json"))
        check_values(bundle_config(str(root), overrides), defaults, overrides)
    except ConfigError as e:  # the hint names `--key`, the syntax of bundle runs; here it is --override key=...
        hint = f" {e.hint.replace('--', '')}" if e.hint and e.hint.startswith("Did you mean") else ""
        raise ConfigError(e.key, e.problem + hint) from None


def checked_network(root: Path, checkpoint: Path, overrides: dict):
    """The bundle's ``network_def`` (overrides applied) with the checkpoint's weights, or one line saying which
    override the network refused or how the checkpoint differs from it."""
    from clinseg.pipelines.engine.checkpoints import load_network_weights
    from clinseg.pipelines.export import bundle_config, require_trained_settings

    try:
        network = bundle_config(str(root), overrides).get_parsed_content("network_def")
    except Exception as e:  # noqa: BLE001 - the constructor's refusal, named after the overrides that fed it
        keys = [key for key in overrides if key.replace("::", "#").startswith("network_def")]
        cause = e.__cause__
        if not keys or not isinstance(cause, (ValueError, TypeError)):
            raise
        target = str(e).split("'")[1] if str(e).startswith("Failed to instantiate component '") else "network_def"
        refused = f"{target} refused {'it' if len(keys) == 1 else 'them'}: {str(cause).strip().splitlines()[0]}"
        if len(keys) == 1:
            raise ConfigError(keys[0], refused) from e
        raise InputError(f"the overrides {', '.join(keys)}", refused) from e
    try:
        network = load_network_weights(network, checkpoint)
    except DataError as e:  # one line; the hint of training runs names their options, not the build's
        if "not a PyTorch checkpoint" in e.problem or "does not exist" in e.problem:
            raise DataError(checkpoint, e.problem) from None
        raise DataError(checkpoint, f"{e.problem} Pass the network settings it was trained with "
                        "(--override network_def#channels=...), or another --checkpoint.") from None  # fmt: skip
    try:
        require_trained_settings(str(root), checkpoint, overrides)
    except ConfigError as e:  # one line, as every build error
        raise ConfigError(e.key, f"{e.problem} {e.hint}") from None
    return network


def check_out(out_dir: Path) -> None:
    """``--out`` must be a new or empty folder that can be created."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(out_dir, "is a file; --out must be a new or empty folder.")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise DataError(out_dir, "exists and is not empty; choose a new folder.")
    created = first_missing(out_dir)
    if created is not None and not created.parent.is_dir():
        raise DataError(out_dir, f"cannot be created: {created.parent} is a file.")


def build_app(
    bundle: str,
    out_dir: Path,
    checkpoint: Path | list[Path],
    overrides: dict,
    tolerance: float = 1e-4,
    model_format: str = "torchscript",
) -> dict:
    """Build the application folder; ``model_format`` ``"checkpoint"`` ships ``models/model.pt`` (loaded into
    ``network_def`` by the app) beside the checked TorchScript export instead of using the export.

    Several checkpoints (the folds of a cross-validation, or several seeds) ship as one TorchScript model of their
    :class:`~clinseg.pipelines.engine.ensembles.ProbabilityEnsemble`, which the app runs as one network."""
    from clinseg.pipelines.export import (
        FROM_MODEL_RECORD,
        compare,
        export_ensemble,
        export_torchscript,
        exported_metadata,
    )
    from clinseg.pipelines.runs import provenance

    root = bundle_root(bundle)
    out_dir = Path(out_dir).absolute()
    checkpoints = list(checkpoint) if isinstance(checkpoint, (list, tuple)) else [checkpoint]
    for member in checkpoints:
        if not member.is_file():
            raise DataError(member, f"{'is not a file' if member.exists() else 'does not exist'}; train the "
                            "bundle first or pass --checkpoint.")  # fmt: skip
    if len(checkpoints) > 1 and model_format == "checkpoint":
        raise InputError("--model_format checkpoint", f"ships one checkpoint; an ensemble of {len(checkpoints)} "
                         "ships as one TorchScript model (the default --model_format torchscript).")  # fmt: skip
    check_out(out_dir)
    check_overrides(root, overrides)
    for member in checkpoints:
        checked_network(root, member, overrides)
    checkpoint = checkpoints[0] if len(checkpoints) == 1 else checkpoints
    bundle = str(root)  # export's helpers take a folder path as well as a name
    created = first_missing(out_dir)
    built = False
    try:
        with staged_folder(out_dir) as staging:  # the application appears whole or not at all
            try:
                if isinstance(checkpoint, list):
                    export_ensemble(bundle, checkpoint, staging / "models" / "model.ts", overrides)
                else:
                    export_torchscript(bundle, checkpoint, staging / "models" / "model.ts", overrides)
            except SystemExit as e:  # its message holds the exporter's whole output: the saved traceback keeps it
                lines = [line for line in str(e.code).splitlines() if line.strip()]
                last = next(
                    (line for line in reversed(lines) if line.startswith(("error:", "internal error:"))), lines[-1]
                )
                raise RuntimeError(f"monai.bundle ckpt_export failed: {last}\n" + "\n".join(lines)) from None
            parity = compare(bundle, checkpoint, staging / "models" / "model.ts", overrides)
            if parity["max_abs_logit_difference"] > tolerance:
                raise RuntimeError(
                    f"the TorchScript export differs from the checkpoint by more than {tolerance}: {parity}"
                )
            if model_format == "checkpoint":
                (staging / "models" / "model.ts").unlink()  # the export was only written to check parity
                shutil.copy(checkpoint, staging / "models" / "model.pt")
            config = expanded_config(bundle, checkpoints, overrides)
            metadata = exported_metadata(bundle, overrides)
            is_volume = config["network_def"].get("spatial_dims", 2) == 3
            kind = KINDS[is_volume]
            (staging / "bundle").mkdir()
            (staging / "bundle" / "inference.json").write_text(json.dumps(config, indent=2))
            (staging / "bundle" / "metadata.json").write_text(json.dumps(metadata, indent=4))
            for package in PACKAGES:  # under the import root the configs name (clinseg.pipelines, ...)
                shutil.copytree(SOURCE_ROOT / package, staging / "clinseg" / package, ignore=IGNORED)
            shutil.copy(SOURCE_ROOT / "requirements-deploy.txt", staging / "requirements.txt")
            values = {"bundle": root.name, "title": metadata["name"], "version": metadata["version"], **kind}
            values["model"] = f"models/{'model.pt' if model_format == 'checkpoint' else 'model.ts'}"
            (staging / "app.py").write_text(APP_PY.format(**values))
            (staging / "__main__.py").write_text(MAIN_PY)
            (staging / "app.yaml").write_text(APP_YAML.format(**values))
            (staging / "README.md").write_text(README.format(**values))
            if is_volume:
                (staging / "series_rules.json").write_text(json.dumps(CT_RULES, indent=2))
            shipped = [str(c) for c in checkpoints] if len(checkpoints) > 1 else str(checkpoints[0])
            report = {"bundle": values["bundle"], "app": str(out_dir), "checkpoint": shipped, **parity}
            if len(checkpoints) > 1:
                report["ensemble_size"] = len(checkpoints)
            report["model"] = values["model"]
            # the checkpoints' SHA-256 and training runs: the app names them in every inference_summary.json
            report["exported_from"] = provenance(checkpoints if len(checkpoints) > 1 else checkpoints[0])
            for key in FROM_MODEL_RECORD:  # what model.json recorded, shipped as values
                if isinstance(config.get(key), dict):
                    report[key] = config[key]
            (staging / "models" / "export.json").write_text(json.dumps(report, indent=2))
        built = True
    finally:
        if not built:
            remove_created(out_dir.parent, created if created != out_dir else None)
    return report


@entry_point  # any error: the contract's one line (report_error) and exit status 1
def main(argv: list[str] | None = None) -> int:
    parser = CommandLineParser(prog="python -m clinseg.pipelines.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="bundle name (ct_heart, vessels, oct_layers) or a bundle folder")
    parser.add_argument("--out", required=True, help="the application folder to create (new or empty)")
    parser.add_argument(
        "--checkpoint",
        nargs="+",
        default=None,
        help="default: <bundle>/models/model.pt; several files ship their ensemble (mean probabilities)",
    )
    parser.add_argument("--override", nargs="*", default=[], help="config overrides KEY=JSON, as at training")
    parser.add_argument(
        "--model_format",
        choices=["torchscript", "checkpoint"],
        default="torchscript",
        help="ship models/model.ts (default) or models/model.pt + network_def (no TorchScript)",
    )
    args = parser.parse_args(argv)
    root = bundle_root(args.bundle)
    checkpoints = [Path(c).absolute() for c in args.checkpoint or [root / "models" / "model.pt"]]
    checkpoint = checkpoints[0] if len(checkpoints) == 1 else checkpoints
    overrides = parse_overrides(args.override)
    report = build_app(args.bundle, Path(args.out), checkpoint, overrides, model_format=args.model_format)
    print(json.dumps(report, indent=2))
    print(f"run it: cd {args.out} && python app.py -i INPUT -o OUTPUT -m {report['model']}")
    return 0
