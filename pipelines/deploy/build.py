"""Build a self-contained MONAI Deploy application folder from a trained bundle.

    python -m clinseg.pipelines.deploy ct_heart --out deploy/ct_heart_app [--checkpoint PATH] [--override KEY=JSON ...]

The folder holds everything the application needs and nothing of the repository around it:

- ``app.py`` and ``__main__.py``: the application (``python app.py -i IN -o OUT -m models/model.ts``, or
  ``python <folder> ...``, the entry point a MONAI Application Package runs);
- ``app.yaml``: the package manifest (title, version, input/output formats, resources);
- ``requirements.txt``: the pinned runtime packages (the SDK, Holoscan, torch, MONAI, DICOM and image I/O);
- ``models/model.ts``: the TorchScript export (metadata and inference config embedded), checked against the
  checkpoint's logits before it is written into the folder; or, with ``--model_format checkpoint``,
  ``models/model.pt``, which the app loads into ``network_def`` (the path that needs no TorchScript);
- ``bundle/inference.json`` (the bundle's inference config, includes expanded, overrides applied) and
  ``bundle/metadata.json``;
- ``clinseg/``: the project code the config refers to (``clinseg.pipelines``, ``clinseg.datasets``,
  ``clinseg.transforms``);
- ``series_rules.json`` (CT): the DICOM series selection rule, editable (the SDK's rule format);
- ``README.md``: how to run and package it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from clinseg.pipelines.cli import parse_overrides
from clinseg.pipelines.deploy.runtime import CT_RULES
from clinseg.pipelines.export import REPO_ROOT, bundle_config, bundle_paths, compare, export_torchscript

PACKAGES = ("datasets", "transforms", "pipelines")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "benchmarks", "demo.py", "experiments.py")

APP_PY = '''"""MONAI Deploy application of the {bundle} bundle: {title}.

Run: python app.py -i INPUT -o OUTPUT -m {model}   (or set HOLOSCAN_INPUT_PATH, HOLOSCAN_OUTPUT_PATH,
HOLOSCAN_MODEL_PATH). See README.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the project code shipped beside this file

from clinseg.pipelines.deploy.apps import {app_class}, main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main({app_class}, Path(__file__).resolve().parent / "bundle" / "inference.json"))
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

Exit status 0 on success; 1 with one message naming the input and the reason when an input is unusable, and then
no result files are written (outputs are staged and moved into place only at the end).

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
        "inputs": "a folder of DICOM files (one study; the CT series is chosen by `series_rules.json`).",
        "outputs": "`dicom_seg/<uid>.dcm` (DICOM Segmentation, heart = SNOMED CT 80891009, one frame per source "
        "slice, referencing the CT series), `series_seg.nii.gz` (mask in the series' patient space), "
        "`series.json` (heart volume in mL, voxels, spacing, series UID), `series_views.png`.",
    },
    False: {
        "app_class": "ImageSegmentationApp",
        "memory": "2Gi",
        "inputs": "a folder of images (PNG/TIFF/JPEG; for OCT also Duke `.mat` B-scans).",
        "outputs": "per image `<id>_seg.png` (label map), `<id>_overlay.png`, `<id>.json` (area fraction per class"
        "; vessels inside the field of view; OCT: mean thickness per layer).",
    },
}


def expanded_config(bundle: str, overrides: dict) -> dict:
    """The bundle's inference config (and metadata) with the overrides applied, as one dictionary."""
    return bundle_config(bundle, overrides, with_metadata=True).get()


def build_app(
    bundle: str,
    out_dir: Path,
    checkpoint: Path,
    overrides: dict,
    tolerance: float = 1e-4,
    model_format: str = "torchscript",
) -> dict:
    """Build the application folder; ``model_format`` ``"checkpoint"`` ships ``models/model.pt`` (loaded into
    ``network_def`` by the app) beside the checked TorchScript export instead of using the export."""
    paths = bundle_paths(bundle)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SystemExit(f"error: {out_dir}: exists and is not empty; choose a new folder.")
    staging = out_dir.with_name(f".{out_dir.name}.building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        export_torchscript(bundle, checkpoint, staging / "models" / "model.ts", overrides)
        parity = compare(bundle, checkpoint, staging / "models" / "model.ts", overrides)
        if parity["max_abs_logit_difference"] > tolerance:
            raise SystemExit(f"error: the TorchScript export differs from the checkpoint: {parity}")
        if model_format == "checkpoint":
            (staging / "models" / "model.ts").unlink()  # the export was only written to check parity
            shutil.copy(checkpoint, staging / "models" / "model.pt")
        config = expanded_config(bundle, overrides)
        metadata = json.loads(paths["metadata"].read_text())
        is_volume = config["network_def"].get("spatial_dims", 2) == 3
        kind = KINDS[is_volume]
        (staging / "bundle").mkdir()
        (staging / "bundle" / "inference.json").write_text(json.dumps(config, indent=2))
        shutil.copy(paths["metadata"], staging / "bundle" / "metadata.json")
        for package in PACKAGES:  # under the import root the configs name (clinseg.pipelines, ...)
            shutil.copytree(REPO_ROOT / package, staging / "clinseg" / package, ignore=IGNORED)
        shutil.copy(REPO_ROOT / "requirements-deploy.txt", staging / "requirements.txt")
        values = {"bundle": paths["root"].name, "title": metadata["name"], "version": metadata["version"], **kind}
        values["model"] = f"models/{'model.pt' if model_format == 'checkpoint' else 'model.ts'}"
        (staging / "app.py").write_text(APP_PY.format(**values))
        (staging / "__main__.py").write_text(MAIN_PY)
        (staging / "app.yaml").write_text(APP_YAML.format(**values))
        (staging / "README.md").write_text(README.format(**values))
        if is_volume:
            (staging / "series_rules.json").write_text(json.dumps(CT_RULES, indent=2))
        report = {"bundle": values["bundle"], "app": str(out_dir), "checkpoint": str(checkpoint), **parity}
        report["model"] = values["model"]
        (staging / "models" / "export.json").write_text(json.dumps(report, indent=2))
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="bundle name (ct_heart, vessels, oct_layers) or a bundle folder")
    parser.add_argument("--out", required=True, help="the application folder to create (new or empty)")
    parser.add_argument("--checkpoint", default=None, help="default: <bundle>/models/model.pt")
    parser.add_argument("--override", nargs="*", default=[], help="config overrides KEY=JSON, as at training")
    parser.add_argument(
        "--model_format",
        choices=["torchscript", "checkpoint"],
        default="torchscript",
        help="ship models/model.ts (default) or models/model.pt + network_def (no TorchScript)",
    )
    args = parser.parse_args(argv)
    checkpoint = Path(args.checkpoint or bundle_paths(args.bundle)["root"] / "models" / "model.pt")
    if not checkpoint.is_file():
        print(f"error: {checkpoint}: does not exist; train the bundle first or pass --checkpoint.", file=sys.stderr)
        return 2
    overrides = parse_overrides(args.override)
    report = build_app(args.bundle, Path(args.out), checkpoint, overrides, model_format=args.model_format)
    print(json.dumps(report, indent=2))
    print(f"run it: cd {args.out} && python app.py -i INPUT -o OUTPUT -m {report['model']}")
    return 0
