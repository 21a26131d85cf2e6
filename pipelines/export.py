"""Export a trained bundle's model for deployment, and check the export against the checkpoint.

    python -m clinseg.pipelines.export ct_heart [--checkpoint PATH] [--override KEY=JSON ...]

1. Checks the checkpoint against the bundle's network and the ``input_settings`` of its ``model.json`` (one line
   naming the file or the key when they differ), then runs ``python -m monai.bundle ckpt_export network_def`` on
   the bundle's ``inference.json`` and ``metadata.json``: TorchScript with the metadata and the inference config
   embedded, the form MONAI Deploy's bundle operator and ``monai-deploy package -m`` take. The embedded config is
   ``inference.json`` with the overrides applied (and the model's decision rule as a value), since those operators
   build their pre- and post-processing from it: a model trained at another spacing or with another network must
   carry those settings. A training checkpoint (``latest_checkpoint_epoch=N.pt``) exports its ``model`` entry.
2. Feeds one input of the network's documented shape (``metadata.json``'s ``network_data_format``) to the
   checkpoint's network (``network_def`` + ``models/model.pt``, the successor path that needs no TorchScript) and
   to the TorchScript model, and reports the largest absolute difference of the logits; a difference above
   ``--tolerance`` fails the export.
3. Only then replaces ``models/model.ts`` and ``models/export.json`` (what was exported and the measured
   difference) together: a refused export leaves the earlier ones as they were.

``--override`` takes the same config overrides as training (e.g. a smaller network), so that the checkpoint
and the exported network agree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from clinseg.datasets.errors import DataError
from clinseg.datasets.io import atomic_write, atomic_write_all
from clinseg.pipelines import cli
from clinseg.pipelines.cli import parse_overrides
from clinseg.pipelines.paths import SOURCE_ROOT


def bundle_paths(bundle: str) -> dict[str, Path]:
    # absolute: ckpt_export runs from the repository root, where a folder given relative to the caller's is not
    root = (Path(bundle) if os.sep in bundle else SOURCE_ROOT / "bundles" / bundle).absolute()
    if not (root / "configs" / "train.json").is_file():
        raise SystemExit(f"error: {root}: not a bundle of this project (no configs/train.json).")
    return {
        "root": root,
        "configs": [root / "configs" / "inference.json"],
        "metadata": root / "configs" / "metadata.json",
    }


FROM_MODEL_RECORD = ("decision_rule", "learnt_retina_height")
"""Config keys whose value an export reads from the model's ``model.json`` (:func:`embedded_config`)."""


def embedded_config(bundle: str, checkpoints: list[Path], overrides: dict, with_metadata: bool = False) -> dict:
    """The inference config an export carries and a Deploy app ships: the bundle's ``inference.json`` with the
    overrides applied (MONAI Deploy's bundle operator builds its processing from the config inside ``model.ts``, so
    the spacing, window and network the model was trained with must be the ones written there), and what the
    model's ``model.json`` records for its inference as values, since that file does not travel with it: the
    decision rule (:func:`~clinseg.pipelines.engine.decision.rule_for`) and the retina heights of an OCT model's
    training labels (:func:`~clinseg.pipelines.engine.ensembles.training_label_range`)."""
    from clinseg.pipelines.engine.decision import rule_for
    from clinseg.pipelines.engine.ensembles import training_label_range

    from_record = {
        "decision_rule": rule_for,
        "learnt_retina_height": lambda paths: training_label_range(paths, "retina_height"),
    }
    config = bundle_config(bundle, overrides, with_metadata=with_metadata).get()
    for key in FROM_MODEL_RECORD:
        if isinstance(config.get(key), str):
            config[key] = from_record[key]([str(c) for c in checkpoints])
    return config


def checkpoint_key(checkpoint: Path) -> str:
    """Where the network's weights are in ``checkpoint``: ``"model"`` for a training checkpoint (model, optimizer,
    trainer state), ``""`` for ``model.pt`` (the state dict itself); ``ckpt_export``'s ``--key_in_ckpt``."""
    from clinseg.pipelines.engine.checkpoints import read_checkpoint

    content = read_checkpoint(checkpoint, map_location="cpu")
    return "model" if isinstance(content, Mapping) and isinstance(content.get("model"), Mapping) else ""


def export_torchscript(bundle: str, checkpoint: Path, out: Path, overrides: dict) -> None:
    """``monai.bundle ckpt_export`` as a user runs it (a subprocess from the repository root), on the config that
    :func:`embedded_config` gives (written as ``inference.json``, the name the export carries it under); ``out``
    is replaced only by a whole export."""
    paths = bundle_paths(bundle)
    with tempfile.TemporaryDirectory(prefix="clinseg-export-") as folder:
        config_file = Path(folder) / "inference.json"
        config_file.write_text(json.dumps(embedded_config(bundle, [checkpoint], overrides), default=str))
        meta_file = Path(folder) / "metadata.json"
        meta_file.write_text(json.dumps(exported_metadata(bundle, overrides), indent=4))
        exported = Path(folder) / "model.ts"
        command = [
            sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
            "--filepath", str(exported),
            "--ckpt_file", str(Path(checkpoint).absolute()),
            "--key_in_ckpt", checkpoint_key(checkpoint),
            "--meta_file", str(meta_file),
            "--config_file", str(config_file),
            "--bundle_root", str(paths["root"]),
        ]  # fmt: skip
        result = subprocess.run(command, cwd=SOURCE_ROOT, capture_output=True, text=True)
        if result.returncode != 0 or not exported.is_file():
            raise SystemExit(
                f"error: ckpt_export failed ({result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
            )
        atomic_write(out, lambda tmp: shutil.copyfile(exported, tmp))


def bundle_config(bundle: str, overrides: dict, with_metadata: bool = False):
    """A ``ConfigParser`` over the bundle's ``inference.json`` (a self-contained config) with the overrides applied,
    wherever the caller runs."""
    from monai.bundle import ConfigParser

    paths = bundle_paths(bundle)
    parser = ConfigParser()
    parser.read_config([str(p) for p in paths["configs"]])
    if with_metadata:
        parser.read_meta(str(paths["metadata"]))
    parser["bundle_root"] = str(paths["root"])
    for key, value in overrides.items():
        parser[key] = value
    parser.resolve_macro_and_relative_ids()
    return parser


def checkpoint_network(bundle: str, checkpoint: Path, overrides: dict) -> torch.nn.Module:
    """The bundle's ``network_def`` with the checkpoint's weights (the ``model.pt`` + ``network_def`` path)."""
    network = bundle_config(bundle, overrides).get_parsed_content("network_def")
    from clinseg.pipelines.engine.checkpoints import load_network_weights

    require_trained_settings(bundle, checkpoint, overrides)
    return load_network_weights(network, checkpoint).eval()


def require_trained_settings(bundle: str, checkpoint: Path | list[Path], overrides: dict) -> None:
    """The bundle's ``input_settings`` with the overrides are those the checkpoint was trained with (an export or a
    Deploy app carries them in its config): :func:`clinseg.pipelines.runs.require_input_settings`."""
    from clinseg.pipelines import runs

    settings = bundle_config(bundle, overrides).get_parsed_content("input_settings")
    runs.require_input_settings(checkpoint, settings, option="--override '{key}={value}'")


def network_inputs(config: dict) -> dict:
    """``network_data_format.inputs.image``'s channel facts for a task's inference config: the number of channels
    its network takes (its ``network_def#in_channels``, evaluated as the bundle evaluates it: ``--channels rgb``
    gives 3) and what each one is, so that the metadata says what the network really sees and the Model Zoo's
    ``verify_net_in_out`` feeds it an input of that many channels."""
    from monai.bundle import ConfigParser

    in_channels = int(ConfigParser(config).get_parsed_content("network_def#in_channels"))
    channels = config.get("channels")
    if channels is None:  # a template without a channel choice (oct_layers): its own description holds
        return {"num_channels": in_channels}
    names = ["red", "green", "blue"] if in_channels == 3 else ["luminance" if channels == "grey" else channels]
    channel_def = {str(i): f"{name} channel, z-scored inside the field of view" for i, name in enumerate(names)}
    return {"num_channels": in_channels, "channel_def": channel_def}


def exported_metadata(bundle: str, overrides: dict) -> dict:
    """The bundle's ``metadata.json`` as the exported model is: its network's input and output facts
    (``network_data_format``) taken from the inference config with the overrides the model was trained with, so that
    a model trained on RGB photographs (``channels rgb``), at another ``image_size`` or ``patch_size``, or with other
    classes is described, checked (``verify_net_in_out``, the parity check) and shipped as what it is."""
    paths = bundle_paths(bundle)
    metadata = json.loads(paths["metadata"].read_text())
    parser = bundle_config(bundle, overrides)
    formats = metadata["network_data_format"]
    image = {**formats["inputs"]["image"], **network_inputs(parser.get())}
    if image["num_channels"] != formats["inputs"]["image"]["num_channels"] and "channel_def" not in image:
        image["channel_def"] = {str(i): f"channel {i}" for i in range(image["num_channels"])}
    for key in ("image_size", "patch_size"):  # the network's input size, where the bundle fixes one
        if key in parser:
            image["spatial_shape"] = [int(v) for v in parser.get_parsed_content(key)]
            break
    formats["inputs"]["image"] = image
    if "class_names" in parser:
        names = list(parser.get_parsed_content("class_names"))
        prediction = dict(formats["outputs"]["pred"])
        prediction.update(num_channels=len(names), channel_def={str(i): name for i, name in enumerate(names)})
        formats["outputs"]["pred"] = prediction
    return metadata


def concrete_shape(spatial_shape: list, n: int = 2) -> list[int]:
    """The metadata's ``spatial_shape`` with its symbolic sizes (``"16*n"``, ``"2**p"``) made concrete, as MONAI's
    ``verify_net_in_out`` does (here with ``n = p = 2``)."""
    return [int(eval(str(size), {"__builtins__": {}}, {"n": n, "p": n, "any": n})) for size in spatial_shape]


def example_input(metadata: dict, overrides: dict, seed: int = 0) -> torch.Tensor:
    spec = metadata["network_data_format"]["inputs"]["image"]
    shape = overrides.get("patch_size") or concrete_shape(spec["spatial_shape"])
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((1, spec["num_channels"], *shape), generator=generator)


def export_ensemble(bundle: str, checkpoints: list[Path], out: Path, overrides: dict) -> None:
    """An ensemble of the bundle's ``network_def`` loaded from each of ``checkpoints``
    (:class:`clinseg.pipelines.engine.ensembles.ProbabilityEnsemble`: the log of the members' mean probability) as
    one TorchScript model, with the bundle's metadata and inference config embedded as ``ckpt_export`` embeds them,
    so a Deploy app runs it as it runs one network."""
    from monai.data import save_net_with_metadata

    scripted = torch.jit.script(ensemble_network(bundle, checkpoints, overrides))
    config = embedded_config(bundle, checkpoints, overrides)
    save = lambda tmp: save_net_with_metadata(  # noqa: E731
        scripted,
        str(tmp),
        meta_values=exported_metadata(bundle, overrides),
        more_extra_files={"inference.json": json.dumps(config, default=str).encode()},
    )
    atomic_write(out, save)


def ensemble_network(bundle: str, checkpoints: list[Path], overrides: dict) -> torch.nn.Module:
    from clinseg.pipelines.engine.ensembles import ProbabilityEnsemble

    members = [checkpoint_network(bundle, c, overrides) for c in checkpoints]
    return members[0] if len(members) == 1 else ProbabilityEnsemble(members).eval()


def compare(bundle: str, checkpoint: Path | list[Path], torchscript: Path, overrides: dict) -> dict:
    """The TorchScript model's output against the checkpoint's network (or the ensemble of a list of checkpoints) on
    one example input: the largest difference and the share of pixels with the same class."""
    network = ensemble_network(bundle, checkpoint if isinstance(checkpoint, list) else [checkpoint], overrides)
    scripted = torch.jit.load(str(torchscript), map_location="cpu").eval()
    x = example_input(exported_metadata(bundle, overrides), overrides)
    with torch.no_grad():
        eager, exported = network(x), scripted(x)
    return {
        "input_shape": list(x.shape),
        "max_abs_logit_difference": float((eager - exported).abs().max()),
        "same_argmax_fraction": float((eager.argmax(1) == exported.argmax(1)).float().mean()),
    }


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="bundle name (ct_heart, vessels, oct_layers) or a bundle folder")
    parser.add_argument("--checkpoint", default=None, help="default: <bundle>/models/model.pt")
    parser.add_argument("--out", default=None, help="default: <bundle>/models/model.ts")
    parser.add_argument("--override", nargs="*", default=[], help="config overrides KEY=JSON, as at training")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted logit difference")
    args = parser.parse_args(argv)
    paths = bundle_paths(args.bundle)
    checkpoint = Path(args.checkpoint or paths["root"] / "models" / "model.pt")
    if not checkpoint.is_file():
        raise DataError(checkpoint, "does not exist.", "Train the bundle first or pass --checkpoint.")
    out = Path(args.out or paths["root"] / "models" / "model.ts")
    overrides = parse_overrides(args.override)
    started = time.perf_counter()
    checkpoint_network(args.bundle, checkpoint, overrides)  # a checkpoint that does not fit: one line, nothing written
    with tempfile.TemporaryDirectory(prefix="clinseg-export-") as folder:
        exported = Path(folder) / "model.ts"
        export_torchscript(args.bundle, checkpoint, exported, overrides)
        check = compare(args.bundle, checkpoint, exported, overrides)
        report = {
            "bundle": paths["root"].name,
            "checkpoint": str(checkpoint),
            "torchscript": str(out),
            "overrides": overrides,
            "export_s": round(time.perf_counter() - started, 1),
            **check,
        }
        print(json.dumps(report, indent=2))
        if check["max_abs_logit_difference"] > args.tolerance:
            difference = check["max_abs_logit_difference"]
            raise DataError(out, f"not written: the TorchScript export and {checkpoint} disagree by "
                            f"{difference:.3g} (above --tolerance {args.tolerance:g}).")  # fmt: skip
        # the model and its report replace the earlier ones together, and only once the export is checked
        atomic_write_all([
            (out, lambda tmp: shutil.copyfile(exported, tmp)),
            (out.parent / "export.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2))),
        ])  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
