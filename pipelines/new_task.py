"""Start a bundle for a new 2D segmentation task from one of the project's 2D bundles.

    python -m clinseg.pipelines.new_task lesions --from vessels --classes background,lesion \\
        [--dataset_dir /data/lesions] [--channels rgb] [--title "Skin lesion segmentation"]
    python -m clinseg.pipelines.new_task fluid --from oct_layers --classes background,IRF,SRF,PED

Templates:

- ``vessels``: binary masks in the generic layout ``<dataset_dir>/images/`` + ``masks/`` (+ optional ``fov/``, a
  field of view outside which nothing is scored), colour or grey images; patch training, sliding-window inference.
- ``oct_layers``: label maps with several classes, ``<dataset_dir>/images/`` + ``labels/`` (label values, or
  colours with ``label_colors``), grey images resized to ``image_size``.

The new folder ``bundles/<name>/`` is a complete bundle (configs in the Model Zoo form, metadata, docs, licence):
the template's configs with the task's name, classes and data folder written in. Everything else (network,
transforms, metrics, training schedule) starts as the template's and is changed like any config value, in the
files or with ``--key value`` on the command line. Without ``--dataset_dir`` (and with the template's number of
classes) the bundle trains on the template's synthetic phantom, generated into ``data/phantoms/<name>`` on first
use, so it runs at once.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from pathlib import Path

from clinseg.datasets.io import staged_folder
from clinseg.pipelines import cli
from clinseg.pipelines.export import network_inputs
from clinseg.pipelines.paths import SOURCE_ROOT

TEMPLATES = {
    "vessels": "binary masks (images/ + masks/ [+ fov/])",
    "oct_layers": "label maps with several classes (images/ + labels/)",
}
NAME = re.compile(r"^[a-z][a-z0-9_]{1,39}$")
COPIED_CONFIGS = (
    "train.json",
    "evaluate.json",
    "inference.json",
    "multi_gpu_train.json",
    "multi_gpu_evaluate.json",
    "metadata.json",
    "logging.conf",
)
README = """# {name}: {title}

A bundle made from the `{template}` template (`python -m clinseg.pipelines.new_task {name} --from {template}`).

- Classes: {classes}.
- Data: {layout}, in `dataset_dir` ({dataset_dir}).
- Everything else (network, transforms, metrics, schedule) is the `{template}` bundle's: see
  `bundles/{template}/docs/README.md`, and change any config value in `configs/` or with `--key value`.
- From the vessels template, `estimate_fov` and `scale_to_fov` are off: an image without a mask in `fov/` counts
  whole, at its own scale. For fundus photographs, `--estimate_fov True --scale_to_fov True` estimates their field
  of view and resamples them to one disc size, as the vessels bundle does.
- From the oct_layers template, `layer_order` is off: the classes need not be layers stacked in a fixed order.
  For retinal layers, `--layer_order True` keeps every column's labels in the order of `class_names`.

```bash
python -m monai.bundle run training --config_file {train}{options}
python -m monai.bundle run evaluating{options} \\
    --config_file "['{train}','{evaluate}']"
python -m monai.bundle run inferring --config_file {inference}{options} \\
    --input_dir /path/to/images --output_dir /path/to/predictions
```
"""


class TaskError(ValueError):
    pass


def _replace_strings(node, old: str, new: str):
    if isinstance(node, dict):
        return {key: _replace_strings(value, old, new) for key, value in node.items()}
    if isinstance(node, list):
        return [_replace_strings(value, old, new) for value in node]
    return node.replace(old, new) if isinstance(node, str) else node


def task_config(
    config: dict, name: str, template: str, classes: list[str] | None, dataset_dir: str | None, channels: str | None
) -> dict:
    """A template config (train, inference or an overlay) with the new task's facts written in."""
    config = _replace_strings(config, f"bundles/{template}/", f"bundles/{name}/")
    if "bundle_name" in config:
        config["bundle_name"] = name
        config["bundle_root"] = f"bundles/{name}"
    if classes is not None and "class_names" in config:
        config["class_names"] = classes
        if isinstance(config.get("palette"), list) and len(config["palette"]) < len(classes):
            config["palette"] = None  # the report's default colours cover any number of classes
        if "label_colors" in config:
            config["label_colors"] = None
    if dataset_dir is not None and "dataset_dir" in config:
        config["dataset_dir"] = dataset_dir
    if channels is not None and "channels" in config:
        config["channels"] = channels
    # facts of the templates' anatomy: a new task's photographs may have no field of view, its classes no layers
    for anatomy_only in ("estimate_fov", "scale_to_fov", "layer_order"):
        if anatomy_only in config:
            config[anatomy_only] = False
    return config


def task_metadata(
    metadata: dict, name: str, template: str, title: str, classes: list[str], inputs: dict | None = None
) -> dict:
    metadata = dict(metadata)
    metadata["version"] = "0.1.0"
    metadata["changelog"] = {"0.1.0": f"first version, from the {template} template"}
    metadata["name"] = title
    metadata["task"] = f"2D segmentation: {', '.join(classes[1:])}"
    metadata["description"] = f"{title}: the {template} bundle's network and pipeline trained on this task's data."
    metadata["label_classes"] = ", ".join(f"{i} {c}" for i, c in enumerate(classes))
    metadata["pred_classes"] = f"{len(classes)} channels: {', '.join(classes)}"
    metadata["eval_metrics"] = {}
    outputs = json.loads(json.dumps(metadata["network_data_format"]["outputs"]))
    outputs["pred"]["num_channels"] = len(classes)
    outputs["pred"]["channel_def"] = {str(i): c for i, c in enumerate(classes)}
    image = {**metadata["network_data_format"]["inputs"]["image"], **(inputs or {})}
    if "channel_def" in (inputs or {}):  # the template's words for its own input no longer hold
        names = [d.split(" channel")[0] for d in image["channel_def"].values()]
        which = f"the {', '.join(names[:-1])} and {names[-1]} channels" if len(names) > 1 else f"the {names[0]} channel"
        metadata["image_classes"] = f"photograph, uint8; {which} (`channels`), z-scored inside the field of view"
    inputs_format = {**metadata["network_data_format"]["inputs"], "image": image}
    metadata["network_data_format"] = {"inputs": inputs_format, "outputs": outputs}
    return metadata


def run_options(target: Path) -> str:
    """How a command names the new bundle: its configs under ``bundles/`` from the repository root (the configs'
    own ``bundle_root``), or, for a bundle written elsewhere (``--bundles_dir``), its folder as ``--bundle_root``, so
    that what a run writes (its outputs, the promoted model) goes into that bundle and not into ``bundles/<name>``
    under whatever folder the command is run from."""
    if target.resolve() == (SOURCE_ROOT / "bundles" / target.name).resolve():
        return ""
    return f" --bundle_root {shlex.quote(str(target))}"


def config_path(target: Path, file_name: str) -> str:
    if not run_options(target):
        return f"bundles/{target.name}/configs/{file_name}"
    return str(target / "configs" / file_name)


def dump(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=4, ensure_ascii=True) + "\n")  # the Model Zoo's JSON format


def new_task(
    name: str,
    template: str,
    classes: list[str] | None = None,
    dataset_dir: str | None = None,
    channels: str | None = None,
    title: str | None = None,
    bundles_dir: Path | None = None,
) -> Path:
    """Write ``<bundles_dir>/<name>/`` from ``template``; the folder appears whole or not at all."""
    bundles_dir = Path(bundles_dir or SOURCE_ROOT / "bundles")
    if not NAME.match(name):
        raise TaskError(f"'{name}': a bundle name is 2-40 lower-case letters, digits or '_', starting with a letter.")
    if template not in TEMPLATES:
        raise TaskError(f"'{template}': no such template; choose one of {sorted(TEMPLATES)}.")
    target = bundles_dir / name
    if target.exists():
        raise TaskError(f"{target}: exists already; choose another name.")
    source = bundles_dir / template if (bundles_dir / template).is_dir() else SOURCE_ROOT / "bundles" / template
    template_train = json.loads((source / "configs" / "train.json").read_text())
    classes = classes or template_train["class_names"]
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise TaskError(f"--classes {','.join(classes)}: give the background and at least one class, each once.")
    if template == "vessels" and len(classes) != 2:
        raise TaskError("--classes: the vessels template segments one class (binary masks); use --from oct_layers.")
    if dataset_dir is None and len(classes) != len(template_train["class_names"]):
        raise TaskError(
            f"--dataset_dir: needed for {len(classes)} classes (the {template} phantom has "
            f"{len(template_train['class_names'])})."
        )
    title = title or name.replace("_", " ").capitalize() + " segmentation"
    with staged_folder(target) as staging:  # the bundle appears whole or not at all
        (staging / "configs").mkdir(parents=True)
        (staging / "models").mkdir()
        (staging / "docs").mkdir()
        (staging / "models" / ".gitkeep").touch()
        shutil.copy(source / "LICENSE", staging / "LICENSE")
        for file_name in COPIED_CONFIGS:
            path = source / "configs" / file_name
            if file_name == "logging.conf":
                shutil.copy(path, staging / "configs" / file_name)
            elif file_name == "metadata.json":
                inference = json.loads((source / "configs" / "inference.json").read_text())
                inputs = network_inputs(task_config(inference, name, template, classes, dataset_dir, channels))
                dump(
                    staging / "configs" / file_name,
                    task_metadata(json.loads(path.read_text()), name, template, title, classes, inputs),
                )
            else:
                config = task_config(json.loads(path.read_text()), name, template, classes, dataset_dir, channels)
                dump(staging / "configs" / file_name, config)
        layout = TEMPLATES[template]
        readme = README.format(
            name=name,
            title=title,
            template=template,
            classes=", ".join(classes),
            layout=layout,
            dataset_dir=f"`{dataset_dir}`" if dataset_dir else "default: the template's phantom",
            options=run_options(target),
            **{key: config_path(target, f"{key}.json") for key in ("train", "evaluate", "inference")},
        )
        (staging / "docs" / "README.md").write_text(readme)
    return target


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="the new bundle's name (its folder, MLflow experiment and Zoo name)")
    parser.add_argument("--from", dest="template", required=True, choices=sorted(TEMPLATES))
    parser.add_argument("--classes", default=None, help="class names, background first: background,lesion")
    parser.add_argument("--dataset_dir", default=None, help="the task's data folder (default: the template phantom)")
    parser.add_argument("--channels", default=None, help="vessels template: green, red, blue, grey or rgb")
    parser.add_argument("--title", default=None, help="the bundle's display name (metadata)")
    parser.add_argument("--bundles_dir", default=None, help="where bundles live (default: the project's bundles/)")
    args = parser.parse_args(argv)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    try:
        target = new_task(
            args.name,
            args.template,
            classes,
            args.dataset_dir,
            args.channels,
            args.title,
            Path(args.bundles_dir) if args.bundles_dir else None,
        )
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {target}; train it with:")
    train = shlex.quote(str(target / "configs" / "train.json"))
    print(f"  python -m monai.bundle run training --config_file {train}{run_options(target)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
