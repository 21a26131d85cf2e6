"""The MONAI Model Zoo's checks on every bundle, as its CI runs them (``ci/verify_bundle.py`` and its unit-test
patterns), plus what makes a bundle a real bundle: a folder that runs anywhere with ``--bundle_root``.

- JSON in the Zoo's format (its ``pretty-format-json`` hook: 4-space indent, one item a line, ASCII, one newline);
- ``verify_metadata`` against the schema the metadata names, and the declared versions equal to those installed;
- ``verify_net_in_out`` and ``ckpt_export`` with ``inference.json`` alone;
- ``ConfigWorkflow(...).check_properties()`` for train, eval (``train.json`` + ``evaluate.json``) and infer, and for
  the multi-GPU overlays (the Zoo's dist pattern, here on Gloo);
- no config block copied between bundles (the shared steps live in ``clinseg.pipelines``);
- a bundle copied out of the repository trains, infers and exports from another folder;
- the project's folders never shadow Hugging Face's ``datasets`` package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, free_port

BUNDLES = ["vessels", "oct_layers", "ct_heart"]
SCHEMA = REPO_ROOT / "tests" / "data" / "model_zoo" / "meta_schema_20220324.json"
CONFIG_FILES = sorted((REPO_ROOT / "bundles").glob("*/configs/*.json"))


def monai_bundle(*args: str, cwd: Path = REPO_ROOT, env: dict | None = None, check: bool = True):
    command = [sys.executable, "-m", "monai.bundle", *args]
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-6000:]}")
    return result


def configs(bundle: str) -> Path:
    return REPO_ROOT / "bundles" / bundle / "configs"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: f"{p.parents[1].name}/{p.name}")
def test_configs_are_in_the_model_zoo_json_format(path):
    text = path.read_text()
    assert text == json.dumps(json.loads(text), indent=4, ensure_ascii=True) + "\n", f"{path} is not Zoo-formatted"


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_verifies_against_its_schema_with_the_installed_versions(bundle):
    metadata_file = configs(bundle) / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    assert metadata["schema"].endswith(SCHEMA.name), "the metadata names the schema it is checked against"
    result = monai_bundle("verify_metadata", "--meta_file", str(metadata_file), "--filepath", str(SCHEMA))
    assert "metadata is verified with no error" in result.stdout + result.stderr
    assert metadata["version"] in metadata["changelog"], "the Zoo requires the version in the changelog"
    assert metadata["monai_version"] == version("monai") and metadata["numpy_version"] == version("numpy")
    assert version("torch").startswith(metadata["pytorch_version"])
    for package, declared in metadata["optional_packages_version"].items():
        assert version(package) == declared, f"{bundle} declares {package} {declared}, {version(package)} is installed"
    assert (REPO_ROOT / "bundles" / bundle / "LICENSE").is_file()


def test_the_metadata_check_fails_on_incomplete_metadata(tmp_path):
    metadata = json.loads((configs("vessels") / "metadata.json").read_text())
    del metadata["optional_packages_version"]
    (tmp_path / "metadata.json").write_text(json.dumps(metadata))
    result = monai_bundle(
        "verify_metadata", "--meta_file", str(tmp_path / "metadata.json"), "--filepath", str(SCHEMA), check=False
    )
    assert result.returncode != 0 and "optional_packages_version" in result.stdout + result.stderr


def _leaf_settings(node) -> int:
    """Leaves that are settings: values, component choices (``_target_``) and expressions; a plain ``@id``
    reference is wiring between a bundle's own parts, not a setting."""
    if isinstance(node, dict):
        return sum(_leaf_settings(value) for value in node.values())
    if isinstance(node, list):
        return sum(_leaf_settings(value) for value in node)
    return 0 if isinstance(node, str) and node.startswith("@") else 1


def _subtrees(node, path=""):
    if isinstance(node, (dict, list)):
        yield path, node
        for key, value in node.items() if isinstance(node, dict) else enumerate(node):
            yield from _subtrees(value, f"{path}#{key}")


def copied_blocks(min_settings: int = 6) -> dict[str, list[str]]:
    """Config subtrees of ``min_settings`` or more leaf settings that appear, identical, in two bundles."""
    seen: dict[str, set[str]] = {}
    for path in CONFIG_FILES:
        if path.name == "metadata.json":
            continue
        for sub_id, node in _subtrees(json.loads(path.read_text())):
            if _leaf_settings(node) >= min_settings:
                seen.setdefault(json.dumps(node, sort_keys=True), set()).add(
                    f"{path.parents[1].name}/{path.name}{sub_id}"
                )
    return {block: sorted(where) for block, where in seen.items() if len({w.split("/")[0] for w in where}) > 1}


def test_no_config_block_is_copied_between_bundles():
    copies = copied_blocks()
    assert not copies, "blocks repeated across bundles (move them into clinseg.pipelines):\n" + "\n".join(
        f"{where}: {block[:200]}" for block, where in copies.items()
    )
    # the measure can fail: an identical block placed in two bundles is found
    vessels = json.loads((configs("vessels") / "train.json").read_text())
    assert _leaf_settings(vessels["train"]["random_transforms"]) >= 6


@pytest.mark.parametrize("bundle", BUNDLES)
def test_network_shape_and_torchscript_export_from_inference_json_alone(bundle, tmp_path):
    """``verify_net_in_out`` and ``ckpt_export`` as the Zoo runs them, from a folder outside the repository."""
    import torch
    from monai.bundle import ConfigParser

    root, inference, metadata = (
        REPO_ROOT / "bundles" / bundle,
        configs(bundle) / "inference.json",
        configs(bundle) / "metadata.json",
    )
    common = ["--meta_file", str(metadata), "--config_file", str(inference), "--bundle_root", str(root)]
    result = monai_bundle("verify_net_in_out", "--net_id", "network_def", *common, cwd=tmp_path)
    assert "data shape of network is verified with no error" in result.stdout + result.stderr
    parser = ConfigParser()
    parser.read_config(str(inference))
    network = parser.get_parsed_content("network_def")
    torch.save(network.state_dict(), tmp_path / "model.pt")  # a plain state dict, the form model.pt has
    exported = tmp_path / "model.ts"
    monai_bundle(
        "ckpt_export",
        "network_def",
        "--filepath",
        str(exported),
        "--ckpt_file",
        str(tmp_path / "model.pt"),
        *common,
        cwd=tmp_path,
    )
    scripted = torch.jit.load(str(exported))
    shape = json.loads(metadata.read_text())["network_data_format"]["inputs"]["image"]
    from clinseg.pipelines.export import concrete_shape

    x = torch.rand(1, shape["num_channels"], *concrete_shape(shape["spatial_shape"], n=1))
    with torch.no_grad():
        assert torch.allclose(scripted(x), network.eval()(x), atol=1e-5)

    # a model trained with other network settings: one line naming it, the earlier export kept
    parser["network_def#channels"] = [2 * c for c in parser["network_def#channels"]]
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "wider.pt")
    before = exported.read_bytes()
    result = monai_bundle("ckpt_export", "network_def", "--filepath", str(exported), "--ckpt_file",
                          str(tmp_path / "wider.pt"), *common, cwd=tmp_path, check=False)  # fmt: skip
    assert result.returncode == 1
    assert f"error: {tmp_path / 'wider.pt'}: its weights do not fit the " in result.stderr, result.stderr[-3000:]
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
    assert exported.read_bytes() == before


PROPERTIES_SCRIPT = r"""
import json, sys
from monai.bundle import ConfigWorkflow
configs, overrides = sys.argv[1], json.loads(sys.argv[2])
files = {
    "train": (["train.json"], "train"),
    "eval": (["train.json", "evaluate.json"], "train"),  # the Zoo's unit tests check evaluation as a train workflow
    "infer": (["inference.json"], "infer"),
    "multi_gpu_train": (["train.json", "multi_gpu_train.json"], "train"),
    "multi_gpu_evaluate": (["train.json", "evaluate.json", "multi_gpu_evaluate.json"], "train"),
}
missing = {}
for name, (names, workflow_type) in files.items():
    workflow = ConfigWorkflow(
        config_file=[f"{configs}/{n}" for n in names], meta_file=f"{configs}/metadata.json",
        logging_file=f"{configs}/logging.conf", workflow_type=workflow_type, **overrides,
    )
    workflow.initialize()
    missing[name] = workflow.check_properties()
    workflow.finalize()
print("PROPERTIES", json.dumps(missing))
"""


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, tiny_oct_dir) -> dict[str, Path]:
    from clinseg.datasets.ct import write_msd_dataset
    from clinseg.datasets.fundus.phantom import write_drive_layout

    drive = tmp_path_factory.mktemp("zoo_drive")
    write_drive_layout(drive, n_images=4, shape=(112, 104), seed=2)  # at least the default 96 x 96 patch
    ct = write_msd_dataset(tmp_path_factory.mktemp("zoo_ct"), n_train=4, n_test=1, voxel_scale=3.0, progress=False)
    return {"vessels": drive, "oct_layers": tiny_oct_dir, "ct_heart": ct}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_train_eval_infer_and_multi_gpu_workflows_have_the_zoo_properties(bundle, tiny_data, tmp_path, tracking_uri):
    bundle_root = tmp_path / bundle
    shutil.copytree(REPO_ROOT / "bundles" / bundle, bundle_root, ignore=shutil.ignore_patterns("*.pt", "outputs"))
    # the infer and eval workflows load models/model.pt: any weights of the default network will do here
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(configs(bundle) / "inference.json"))
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle_root / "models" / "model.pt")
    overrides = {"bundle_root": str(bundle_root), "dataset_dir": str(tiny_data[bundle]), "cache": "none"}
    env = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    result = subprocess.run(
        [sys.executable, "-c", PROPERTIES_SCRIPT, str(bundle_root / "configs"), json.dumps(overrides)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stderr[-6000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("PROPERTIES "))
    missing = json.loads(line.removeprefix("PROPERTIES "))
    assert missing == {name: [] for name in missing} and len(missing) == 5, missing


def test_a_bundle_copied_out_of_the_repository_trains_infers_and_exports(tmp_path, tiny_data, tracking_uri):
    """The vessels folder alone, elsewhere, run from a third folder with ``--bundle_root``: one epoch with the
    validation interval above it still leaves ``models/model.pt``, which inference and export then use."""
    bundle = tmp_path / "elsewhere" / "vessels"
    shutil.copytree(
        REPO_ROOT / "bundles" / "vessels", bundle, ignore=shutil.ignore_patterns("*.pt", "outputs", "cache")
    )
    work = tmp_path / "work"
    work.mkdir()
    repo_models = sorted((REPO_ROOT / "bundles" / "vessels" / "models").iterdir())
    tiny = [
        "--bundle_root",
        str(bundle),
        "--dataset_dir",
        str(tiny_data["vessels"]),
        "--patch_size",
        "[32,32]",
        "--sw_roi_size",
        "[48,48]",
        "--network_def#channels",
        "[8,16,32]",
        "--network_def#strides",
        "[2,2]",
        # the phantoms' own disc (about 98 px): enlarged 5.5 times to the default, inference would refuse them
        "--fov_diameter_px",
        "98",
    ]
    # inference.json has no patch_size (it infers whole images): an id a config lacks is refused
    inference_tiny = list(tiny)
    at = inference_tiny.index("--patch_size")
    del inference_tiny[at : at + 2]
    train = configs_of(bundle, "train.json")
    result = monai_bundle(
        "run",
        "training",
        "--config_file",
        train,
        *tiny,
        "--train#trainer#max_epochs",
        "1",
        "--val_interval",
        "2",
        cwd=work,
    )
    assert (bundle / "models" / "model.pt").is_file(), "training leaves models/model.pt without any validation"
    assert "no validation ran in this training" in result.stdout + result.stderr
    out = tmp_path / "predictions"
    monai_bundle(
        "run",
        "inferring",
        "--config_file",
        configs_of(bundle, "inference.json"),
        *inference_tiny,
        "--input_dir",
        str(tiny_data["vessels"] / "training"),
        "--output_dir",
        str(out),
        cwd=work,
    )
    assert len(list(out.glob("*_seg.png"))) == 4, sorted(p.name for p in out.iterdir())
    monai_bundle(
        "ckpt_export",
        "network_def",
        "--filepath",
        str(bundle / "models" / "model.ts"),
        "--ckpt_file",
        str(bundle / "models" / "model.pt"),
        "--meta_file",
        configs_of(bundle, "metadata.json"),
        "--config_file",
        configs_of(bundle, "inference.json"),
        *inference_tiny,
        cwd=work,
    )
    assert (bundle / "models" / "model.ts").is_file()
    assert sorted((REPO_ROOT / "bundles" / "vessels" / "models").iterdir()) == repo_models, (
        "the repository is untouched"
    )
    assert not any(work.iterdir()), "nothing is written into the folder the command runs from"


def configs_of(bundle: Path, name: str) -> str:
    return str(bundle / "configs" / name)


def test_the_project_folders_never_shadow_hugging_face_datasets(tmp_path):
    """Run from the repository root (where a folder named ``datasets`` lies), ``import datasets`` must still give
    the installed ``datasets`` package; here a stand-in regular package of that name on the path."""
    site = tmp_path / "site"
    (site / "datasets").mkdir(parents=True)
    (site / "datasets" / "__init__.py").write_text("ORIGIN = 'installed datasets package'\n")
    code = "import datasets, clinseg.datasets.fundus, clinseg.transforms.fundus; print(datasets.ORIGIN)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "installed datasets package"


@pytest.mark.parametrize("bundle", ["vessels"])
def test_export_runs_with_its_defaults(bundle, tmp_path):
    """``python -m clinseg.pipelines.export <bundle>`` with no overrides: the metadata's symbolic input shape
    (``["16*n", "16*n"]``) is made concrete for the parity check instead of reaching ``torch.rand``."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(configs(bundle) / "inference.json"))
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "model.pt")
    command = [
        sys.executable,
        "-m",
        "clinseg.pipelines.export",
        bundle,
        "--checkpoint",
        str(tmp_path / "model.pt"),
        "--out",
        str(tmp_path / "model.ts"),
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "export.json").read_text())
    assert report["input_shape"] == [1, 1, 32, 32] and report["max_abs_logit_difference"] <= 1e-4


def test_an_export_carries_its_settings_and_a_refused_one_replaces_nothing(tmp_path):
    """``python -m clinseg.pipelines.export`` on a bundle folder elsewhere (given relative to the working folder, a
    space in its path), for a model trained with other settings (a smaller network, another field-of-view size): the
    TorchScript carries the inference config with those settings, since MONAI Deploy's bundle operator builds its
    processing and network from it; a training checkpoint exports its ``model`` entry; and an export refused for a
    setting the model was not trained with leaves the earlier ``model.ts`` and ``export.json`` as they were."""
    import torch
    from monai.bundle import ConfigParser

    from clinseg.pipelines.runs import write_run_record

    bundle = tmp_path / "my bundles" / "vessels"
    shutil.copytree(
        REPO_ROOT / "bundles" / "vessels",
        bundle,
        ignore=shutil.ignore_patterns("models", "outputs", "cache", "eval", "large_files.yml"),
    )
    models = bundle / "models"
    models.mkdir()
    trained = {
        "network_def#channels": [8, 16, 32],
        "network_def#strides": [2, 2],
        "fov_diameter_px": 300,
        "channels": "rgb",  # three input channels where the metadata as written says one
    }
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    for key, value in trained.items():
        parser[key] = value
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    torch.save(network.state_dict(), models / "model.pt")
    write_run_record(models, {"input_settings": parser.get_parsed_content("input_settings")})
    training_checkpoint = tmp_path / "latest_checkpoint_epoch=1.pt"
    optimizer = torch.optim.Adam(network.parameters())
    torch.save({"model": network.state_dict(), "optimizer": optimizer.state_dict()}, training_checkpoint)

    def export(*args: str, settings: dict = trained):
        """The export of the bundle folder as given relative to the folder the command runs from."""
        overrides = [f"{key}={json.dumps(value)}" for key, value in settings.items()]
        folder = str(bundle.relative_to(tmp_path))
        command = [sys.executable, "-m", "clinseg.pipelines.export", folder, *args, "--override", *overrides]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)

    result = export()
    assert result.returncode == 0, result.stderr[-3000:]
    extra = {"inference.json": "", "metadata.json": ""}
    torch.jit.load(str(models / "model.ts"), _extra_files=extra)
    embedded = json.loads(extra["inference.json"])
    assert embedded["fov_diameter_px"] == 300 and embedded["network_def"]["channels"] == [8, 16, 32]
    assert isinstance(embedded["decision_rule"], dict), "the model's decision rule travels as a value"
    image = json.loads(extra["metadata.json"])["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 3 and set(image["channel_def"].values()) >= {"red channel, z-scored inside the "
                                                                               "field of view"}  # fmt: skip
    # the network the embedded config describes is the one whose weights the export holds
    ConfigParser(embedded).get_parsed_content("network_def").load_state_dict(network.state_dict())

    kept = {
        name: ((models / name).read_bytes(), (models / name).stat().st_mtime_ns) for name in ("model.ts", "export.json")
    }
    refused = export(settings={**trained, "fov_diameter_px": 538})
    assert refused.returncode == 1 and "error: config key 'fov_diameter_px': is 538" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert {name: ((models / name).read_bytes(), (models / name).stat().st_mtime_ns) for name in kept} == kept

    out = tmp_path / "from_training" / "model.ts"
    result = export("--checkpoint", training_checkpoint.name, "--out", str(out.relative_to(tmp_path)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out.parent / "export.json").read_text())["max_abs_logit_difference"] <= 1e-4


@pytest.mark.parametrize("workflow", ["inferring", "training"])
def test_a_copied_bundle_run_without_its_bundle_root_is_refused_naming_it(tmp_path, tiny_data, workflow):
    """A copy of the vessels bundle run from the repository root without ``--bundle_root``: the configs' default
    (``bundles/vessels``, relative to the working folder) is the repository's bundle, whose model inference would
    use and whose outputs training would write, while the user ran the copy."""
    from tests.conftest import run_bundle

    bundle = tmp_path / "copy" / "vessels"
    shutil.copytree(
        REPO_ROOT / "bundles" / "vessels", bundle, ignore=shutil.ignore_patterns("*.pt", "outputs", "cache")
    )
    config = "inference.json" if workflow == "inferring" else "train.json"
    data = {"input_dir": tiny_data["vessels"], "output_dir": tmp_path / "out"} if workflow == "inferring" else {}
    repo_outputs = sorted((REPO_ROOT / "bundles" / "vessels").glob("outputs/*"))
    result = run_bundle(workflow, [str(bundle / "configs" / config)], data, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    expected = f"error: config key 'bundle_root': is {REPO_ROOT / 'bundles' / 'vessels'} (the config's default"
    assert expected in result.stderr and f"--bundle_root {bundle}" in result.stderr, result.stderr[-3000:]
    assert sorted((REPO_ROOT / "bundles" / "vessels").glob("outputs/*")) == repo_outputs, "nothing written there"
    assert not (tmp_path / "out").exists()
