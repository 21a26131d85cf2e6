"""Start a bundle for a new 2D segmentation task from one of the project's 2D bundles.

    python -m clinseg.pipelines.new_task lesions --from vessels --classes background,lesion \\
        [--dataset_dir /data/lesions] [--channels rgb] [--title "Skin lesion segmentation"]
    python -m clinseg.pipelines.new_task fluid --from oct_layers --classes background,IRF,SRF,PED

Templates:

- ``vessels``: binary masks in the generic layout ``<dataset_dir>/images/`` + ``masks/`` (+ optional ``fov/``, a
  field of view outside which nothing is scored), colour or grey images; patch training, sliding-window inference.
- ``oct_layers``: label maps with several classes, ``<dataset_dir>/images/`` + ``labels/`` (label values, palette
  PNGs, grey levels mapped with ``--label_values '[0,50,100,150]'`` or colours with
  ``--label_colors '[[0,0,0],[255,0,0],...]'``, one per class; 255: unannotated), grey images resized to
  ``image_size``.

With ``--dataset_dir``, every training and validation label is read first, as the bundle's training reads it, and
the bundle is written only if the labels hold exactly the listed classes (label value ``i`` is ``--classes``' item
``i``); the command prints each class's share of the annotated pixels, to check the names against the values. A
file that cannot be used, a value beyond the classes and a listed class that no label holds are refused.

The new folder ``bundles/<name>/`` is a complete bundle (configs in the Model Zoo form, metadata, docs, licence):
the template's configs with the task's name, classes and data folder written in. Everything else (network,
transforms, metrics, training schedule) starts as the template's and is changed like any config value, in the
files or with ``--key value`` on the command line. Without ``--dataset_dir`` (and with the template's number of
classes) the bundle trains on the template's synthetic phantom, generated into ``data/phantoms/<name>`` on first
use, so it runs at once.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from clinseg.datasets.io import staged_folder
from clinseg.pipelines import cli
from clinseg.pipelines.config_checks import clashing_class_names
from clinseg.pipelines.export import network_inputs
from clinseg.pipelines.paths import SOURCE_ROOT
from clinseg.pipelines.tracking import mlflow_class_name
from clinseg.transforms.fundus import CHANNEL_CHOICES

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
  For retinal layers, `--layer_order True` keeps every column's labels in the order of `class_names`, and makes
  training record its labels' retina heights, against which inference refuses a B-scan whose retina spans more
  than `max_retina_height_ratio` (1.3) times less or more of its rows (a deeper scan, a tight crop). Inference's
  checks of OCT B-scans are off as well: for OCT, `--frame_retina True --min_floor_level 0.01` frames each B-scan's
  retina as training saw it (padding bands and a deeper scan's extra rows cut off) and refuses linear intensities,
  as the oct_layers bundle does (`--frame_retina False --max_padding_fraction 0.2` refuses tall padding bands
  instead of cutting them off).

```bash
python -m monai.bundle run training --config_file {train}{options}
python -m monai.bundle run evaluating{options} \\
    --config_file "['{train}','{evaluate}']"
python -m monai.bundle run inferring --config_file {inference}{options} \\
    --input_dir /path/to/images --output_dir /path/to/predictions
```
"""


ANATOMY_ONLY = {
    "estimate_fov": False,
    "scale_to_fov": False,
    "layer_order": False,
    # the oct_layers inference's checks of a retinal B-scan (padding bands, a log-scaled intensity): another task's
    # grey images may have both, and trained on them, its model would refuse its own kind of image
    "max_padding_fraction": None,
    "frame_retina": False,
    "min_floor_level": None,
    "max_colour_fraction": None,  # and its check of colour photographs: a task's images may be read from colour
}
"""Settings of the templates' anatomy and modality, off in a new task (each is named in the bundle's README)."""


class TaskError(ValueError):
    pass


def check_classes(classes: list[str]) -> None:
    """Refuse class names a run could not keep apart: an empty one, one given twice, or two that MLflow records
    under one metric name (``IRF (a)`` and ``IRF [a]``), where one class's curves would overwrite the other's."""
    listed = f"--classes {','.join(classes)}"
    if len(classes) < 2 or len(set(classes)) != len(classes) or not all(classes):
        raise TaskError(f"{listed}: give the background and at least one class, each once and none empty.")
    backgrounds = [i for i, name in enumerate(classes) if name.casefold() == "background"]
    if backgrounds and backgrounds != [0]:
        # class 0 is what every metric leaves out and every mask's zeros are: a background listed later would be
        # trained and scored as the foreground
        raise TaskError(f"{listed}: 'background' is label value 0, so it comes first.")
    clash = clashing_class_names(classes)  # the rule the bundle's own config check applies at every run
    if clash:
        other, name = clash
        raise TaskError(
            f"{listed}: '{other}' and '{name}' would be recorded in MLflow under one name "
            f"('{mlflow_class_name(name)}'); name them apart with letters, digits, spaces or '_.-:'."
        )


def check_data(config: dict, classes: list[str], label_colors: list | None = None) -> dict[str, int]:
    """Read every training and validation label of the task's data as its training will (the bundle's own data
    lists and loading transforms), before the bundle is written: a file that cannot be used, a label value that is
    not one of the classes, or a colour label without a colour table is refused naming the file; a class that no
    label holds is refused naming the class (the labels' classes are not the ones listed, or not in their order).
    Returns each class's annotated pixels."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    parser = ConfigParser(json.loads(json.dumps(config)))
    if "patch_size" in parser:
        parser["patch_size"] = None  # a training setting (images smaller than a patch), checked when it trains
    parser.get_parsed_content("imports")
    items = parser.get_parsed_content("train#datalist") + parser.get_parsed_content("validate#datalist")
    load = Compose(parser.get_parsed_content("load_transforms"))
    ignore_index = parser.get_parsed_content("ignore_index") if "ignore_index" in parser else None
    counts = np.zeros(len(classes), np.int64)
    for item in items:
        label = np.asarray(load(dict(item))["label"]).astype(np.int64).ravel()
        label = label[label != ignore_index] if ignore_index is not None else label
        if label.size and (label.min() < 0 or label.max() >= len(classes)):
            outside = sorted({int(v) for v in np.unique(label) if not 0 <= v < len(classes)})
            raise TaskError(
                f"{item.get('annotation_source', item['label'])}: label values {outside[:10]} are not among the "
                f"{len(classes)} classes (0..{len(classes) - 1}: {', '.join(classes)}); list every class in --classes."
            )
        counts += np.bincount(label, minlength=len(classes))
    absent = [f"{index} {classes[index]}" for index in np.flatnonzero(counts == 0)]
    if absent:
        how = "colour in --label_colors" if label_colors else "label value"
        how = "value in --label_values" if config.get("label_values") else how
        raise TaskError(
            f"--classes: {', '.join(absent)} ({how}) appears in none of the {len(items)} labels of "
            f"{config['dataset_dir']}; list the classes the labels hold, in the order of their values, background "
            "first."
        )
    return {name: int(count) for name, count in zip(classes, counts, strict=True)}


def _replace_strings(node, old: str, new: str):
    if isinstance(node, dict):
        return {key: _replace_strings(value, old, new) for key, value in node.items()}
    if isinstance(node, list):
        return [_replace_strings(value, old, new) for value in node]
    return node.replace(old, new) if isinstance(node, str) else node


def task_config(
    config: dict,
    name: str,
    template: str,
    classes: list[str] | None,
    dataset_dir: str | None,
    channels: str | None,
    label_colors: list | None = None,
    label_values: list[int] | None = None,
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
            config["label_colors"] = label_colors
        if "label_values" in config:
            # the bundle's form (ct_heart's too): each label value, as a string key, to its class index
            config["label_values"] = None if label_values is None else {str(v): i for i, v in enumerate(label_values)}
    if dataset_dir is not None and "dataset_dir" in config:
        config["dataset_dir"] = dataset_dir
        if isinstance(config.get("input_dir"), str):
            # what inference segments by default: the task's images (images/ of an images + labels layout), not the
            # folder above them, which holds no image itself
            default = config["input_dir"].removeprefix("$")
            images = "os.path.join(@dataset_dir, 'images')"
            config["input_dir"] = f"${images} if os.path.isdir({images}) else ({default})"
    if channels is not None and "channels" in config:
        config["channels"] = channels
    # facts of the templates' anatomy: a new task's photographs may have no field of view, its classes no layers
    for anatomy_only, off in ANATOMY_ONLY.items():
        if anatomy_only in config:
            config[anatomy_only] = off
    return config


def task_metadata(
    metadata: dict,
    name: str,
    template: str,
    title: str,
    classes: list[str],
    inputs: dict | None = None,
    dataset_dir: str | None = None,
) -> dict:
    metadata = dict(metadata)
    metadata["version"] = "0.1.0"
    metadata["changelog"] = {"0.1.0": f"first version, from the {template} template"}
    metadata["name"] = title
    metadata["task"] = f"2D segmentation: {', '.join(classes[1:])}"
    metadata["description"] = f"{title}: the {template} bundle's network and pipeline trained on this task's data."
    metadata["label_classes"] = ", ".join(f"{i} {c}" for i, c in enumerate(classes)) + "; 255 unannotated (ignored)"
    if dataset_dir is not None:  # the template's data sources are not this task's
        metadata["data_source"] = f"the task's own data: {dataset_dir}"
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
    label_colors: list | None = None,
    label_values: list[int] | None = None,
    log: Callable[[str], object] = lambda line: None,
) -> Path:
    """Write ``<bundles_dir>/<name>/`` from ``template``; the folder appears whole or not at all, and only once the
    task's data (``dataset_dir``) has been read as its training will read it (:func:`check_data`). ``log`` gets
    what the data holds, a line per class."""
    # absolute: the commands printed and written into the bundle's README run from any folder
    bundles_dir = Path(os.path.abspath(bundles_dir or SOURCE_ROOT / "bundles"))
    if not NAME.match(name):
        raise TaskError(f"'{name}': a bundle name is 2-40 lower-case letters, digits or '_', starting with a letter.")
    if template not in TEMPLATES:
        raise TaskError(f"'{template}': no such template; choose one of {sorted(TEMPLATES)}.")
    target = bundles_dir / name
    if target.exists():
        raise TaskError(f"{target}: exists already; choose another name.")
    project_bundle = SOURCE_ROOT / "bundles" / name
    if project_bundle.is_dir() and project_bundle.resolve() != target.resolve():
        # the name is the MLflow experiment and the phantom folder: two tasks of one name would mix their runs
        raise TaskError(f"'{name}': is the name of the project's bundle {project_bundle}; choose another name.")
    source = bundles_dir / template if (bundles_dir / template).is_dir() else SOURCE_ROOT / "bundles" / template
    template_train = json.loads((source / "configs" / "train.json").read_text())
    classes = classes or template_train["class_names"]
    check_classes(classes)
    if template == "vessels" and len(classes) != 2:
        raise TaskError("--classes: the vessels template segments one class (binary masks); use --from oct_layers.")
    if channels is not None and "channels" not in template_train:
        raise TaskError(f"--channels {channels}: the {template} template reads grey images; it has no channel choice.")
    if channels is not None and channels not in CHANNEL_CHOICES:
        raise TaskError(f"--channels {channels}: choose one of {', '.join(CHANNEL_CHOICES)}.")
    if label_colors is not None:
        if template == "vessels":
            raise TaskError("--label_colors: the vessels template reads binary masks; use --from oct_layers.")
        if len(label_colors) != len(classes):
            raise TaskError(
                f"--label_colors: {len(label_colors)} colours for {len(classes)} classes; give one [r, g, b] per "
                "class, in the order of --classes."
            )
    if label_values is not None:
        if "label_values" not in template_train:
            raise TaskError(f"--label_values: the {template} template reads binary masks; use --from oct_layers.")
        if label_colors is not None:
            raise TaskError("--label_values, --label_colors: labels are grey levels or colours; give one of them.")
        if len(label_values) != len(classes) or len(set(label_values)) != len(label_values):
            raise TaskError(
                f"--label_values: {len(label_values)} values for {len(classes)} classes; give one distinct label "
                "value per class, in the order of --classes."
            )
    if dataset_dir is None and len(classes) != len(template_train["class_names"]):
        raise TaskError(
            f"--dataset_dir: needed for {len(classes)} classes (the {template} phantom has "
            f"{len(template_train['class_names'])})."
        )
    if dataset_dir is not None:
        # written as an absolute path: the bundle's runs resolve it from whatever folder they are started in
        dataset_dir = os.path.abspath(os.path.expanduser(dataset_dir))
        if os.path.exists(dataset_dir) and not os.path.isdir(dataset_dir):
            raise TaskError(f"{dataset_dir}: --dataset_dir is not a folder.")
    configs = {
        file_name: task_config(
            json.loads((source / "configs" / file_name).read_text()),
            name,
            template,
            classes,
            dataset_dir,
            channels,
            label_colors,
            label_values,
        )
        for file_name in COPIED_CONFIGS
        if file_name.endswith(".json") and file_name != "metadata.json"
    }
    if label_colors is not None:
        try:  # the bundle's own reading of the table: one 8-bit colour per class, no colour twice
            from clinseg.transforms.labels import ColorToLabel

            ColorToLabel(label_colors)
        except ValueError as e:
            raise TaskError(f"--label_colors: {e}") from None
    if dataset_dir is not None and not os.path.isdir(dataset_dir):
        # a bundle may be set up before its data is in place; its first run reads and checks the data instead
        log(f"{dataset_dir} does not exist yet: its data is checked when the bundle first reads it")
    elif dataset_dir is not None:
        pixels = check_data(configs["train.json"], classes, label_colors)
        total = sum(pixels.values())
        log(f"the classes in {dataset_dir} (label value, name, annotated pixels):")
        for index, (class_name, count) in enumerate(pixels.items()):
            log(f"  {index} {class_name}: {count} ({100 * count / total:.2f}%)")
    title = title or name.replace("_", " ").capitalize() + " segmentation"
    inputs = network_inputs(configs["inference.json"])
    with staged_folder(target) as staging:  # the bundle appears whole or not at all
        (staging / "configs").mkdir(parents=True)
        (staging / "models").mkdir()
        (staging / "docs").mkdir()
        (staging / "models" / ".gitkeep").touch()
        shutil.copy(source / "LICENSE", staging / "LICENSE")
        shutil.copy(source / "configs" / "logging.conf", staging / "configs" / "logging.conf")
        metadata = json.loads((source / "configs" / "metadata.json").read_text())
        dump(
            staging / "configs" / "metadata.json",
            task_metadata(metadata, name, template, title, classes, inputs, dataset_dir),
        )
        for file_name, config in configs.items():
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


def parse_per_class(text: str | None, option: str, is_entry: Callable[[object], bool], expected: str) -> list | None:
    """A JSON list given on the command line with one entry per class (``--label_colors``, ``--label_values``),
    each entry checked by ``is_entry``; else a one-line refusal naming ``option`` and what is ``expected``."""
    if text is None:
        return None
    try:
        entries = json.loads(text)
    except json.JSONDecodeError:
        entries = None
    if not isinstance(entries, list) or not all(is_entry(entry) for entry in entries):
        raise TaskError(f"{option} {text}: give a JSON list of {expected}, one per class.")
    return entries


def _is_colour(entry) -> bool:
    return isinstance(entry, list)  # its values are checked by the colour table itself (ColorToLabel)


def _is_label_value(entry) -> bool:
    return isinstance(entry, int) and not isinstance(entry, bool) and 0 <= entry < 65536


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="the new bundle's name (its folder, MLflow experiment and Zoo name)")
    parser.add_argument("--from", dest="template", required=True, choices=sorted(TEMPLATES))
    parser.add_argument("--classes", default=None, help="class names, background first: background,lesion")
    parser.add_argument("--dataset_dir", default=None, help="the task's data folder (default: the template phantom)")
    parser.add_argument("--channels", default=None, help="vessels template: green, red, blue, grey or rgb")
    parser.add_argument(
        "--label_colors", default=None, help="oct_layers template, colour labels: [[0,0,0],[255,0,0],...], a class each"
    )
    parser.add_argument(
        "--label_values", default=None, help="oct_layers template, grey-level labels: [0,50,100,...], a class each"
    )
    parser.add_argument("--title", default=None, help="the bundle's display name (metadata)")
    parser.add_argument("--bundles_dir", default=None, help="where bundles live (default: the project's bundles/)")
    args = parser.parse_args(argv)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    lines: list[str] = []
    try:
        target = new_task(
            args.name,
            args.template,
            classes,
            args.dataset_dir,
            args.channels,
            args.title,
            Path(args.bundles_dir) if args.bundles_dir else None,
            parse_per_class(args.label_colors, "--label_colors", _is_colour, "[r, g, b] colours: [[0,0,0],...]"),
            parse_per_class(args.label_values, "--label_values", _is_label_value, "label values: [0,50,100,...]"),
            log=lines.append,
        )
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    print(f"wrote {target}; train it with:")
    train = shlex.quote(str(target / "configs" / "train.json"))
    print(f"  python -m monai.bundle run training --config_file {train}{run_options(target)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
