"""The entry-point error matrix: classes of user mistakes and environment faults, each run through a real command
line, with one verdict per case.

    python -m clinseg.pipelines.benchmarks.error_matrix [--out data/benchmarks/error_matrix.json] [--repo PATH]
        [--cases ID ...]

Verdicts:

- ``one line``: exit status 1, no ``Traceback``, exactly one ``error:`` line, naming what it must (the key, file
  or folder);
- ``unnamed``: one line, but it names neither the key nor the file;
- ``traceback``: a stack trace was printed (or ``internal error``);
- ``ignored``: the run finished (status 0) although its input is wrong;
- ``status N``: another exit status (argparse's 2 with the usage text).

Every case is a subprocess (``python -m monai.bundle run ...``, ``python -m clinseg.pipelines.experiments ...``),
so the script runs against an older checkout too: make ``clinseg`` resolve there (``PYTHONPATH`` first) and pass
``--repo`` for its configs. The disk-full and read-only cases mount a tmpfs / a read-only bind mount (root only;
skipped otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from clinseg.pipelines.paths import SOURCE_ROOT

TINY = {"image_size": "[32,48]", "network_def#channels": "[4,8]", "network_def#strides": "[2]"}
TRAIN = {**TINY, "train#trainer#max_epochs": "1", "val_interval": "1", "num_workers": "0", "batch_size": "2"}
CASES: dict[str, tuple[str, Callable]] = {}


def case(case_id: str, case_class: str):
    def register(function):
        CASES[case_id] = (case_class, function)
        return function

    return register


class Context:
    def __init__(self, repo: Path, work: Path):
        self.repo, self.work = repo, work
        self.oct = repo / "bundles" / "oct_layers" / "configs"
        self.store = f"sqlite:///{work / 'mlruns.db'}"
        self.data = work / "oct_data"
        if not self.data.exists():
            sys.path.insert(0, str(repo))
            from clinseg.datasets.oct.phantom import write_phantom_dataset

            write_phantom_dataset(self.data, n_subjects=3, n_bscans=2, height=48, width=64, seed=3)

    def folder(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def bundle(self, run_id: str, files: list[str], overrides: dict) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file"]
        command.append(str([str(self.oct / f) for f in files]))
        for key, value in {"dataset_dir": self.data, "tracking_uri": self.store, **overrides}.items():
            command += [f"--{key}", str(value)]
        return self.command(command)

    def module(self, module: str, *arguments: str) -> subprocess.CompletedProcess:
        return self.command([sys.executable, "-m", module, "--tracking_uri", self.store, *arguments])

    def command(self, command: list[str]) -> subprocess.CompletedProcess:
        env = {**os.environ, "CLINSEG_ERROR_DIR": str(self.work / "errors")}
        return subprocess.run(command, cwd=self.repo, capture_output=True, text=True, timeout=600, env=env)


def verdict(result: subprocess.CompletedProcess, names: list[str]) -> tuple[str, str]:
    errors = [line for line in result.stderr.splitlines() if line.startswith(("error:", "internal error:"))]
    first = errors[0] if errors else (result.stderr.strip().splitlines() or [""])[-1]
    if "Traceback" in result.stderr or first.startswith("internal error"):
        return "traceback", first
    if result.returncode == 0:
        return "ignored", "(finished)"
    if result.returncode != 1 or len(errors) != 1:
        return f"status {result.returncode}", first
    return ("one line" if any(name in first for name in names) else "unnamed"), first


# ---- config


@case("override_typo", "config")
def override_typo(ctx: Context):
    return ctx.bundle("training", ["train.json"], {**TRAIN, "bundle_root": ctx.folder("b1"), "batchsize": 1}), [
        "batchsize"
    ]


@case("override_unknown_top_level", "config")
def override_unknown(ctx: Context):
    overrides = {**TINY, "bundle_root": ctx.folder("b2"), "max_epochs": 1}
    return ctx.bundle("training", ["train.json"], overrides), ["max_epochs"]


@case("nested_wrong_type", "config")
def nested_wrong_type(ctx: Context):
    overrides = {**TRAIN, "bundle_root": ctx.folder("b3"), "network_def#channels": "four"}
    return ctx.bundle("training", ["train.json"], overrides), ["network_def#channels"]


@case("constructor_refuses", "config")
def constructor_refuses(ctx: Context):
    overrides = {**TRAIN, "bundle_root": ctx.folder("b4"), "network_def#channels": "[4]"}  # UNet needs two or more
    return ctx.bundle("training", ["train.json"], overrides), ["network_def#channels"]


@case("wrong_choice", "config")
def wrong_choice(ctx: Context):
    return ctx.bundle("training", ["train.json"], {**TRAIN, "bundle_root": ctx.folder("b5"), "cache": "ram"}), ["cache"]


@case("out_of_range", "config")
def out_of_range(ctx: Context):
    overrides = {**TRAIN, "bundle_root": ctx.folder("b6"), "val_fraction": "1.5"}
    return ctx.bundle("training", ["train.json"], overrides), ["val_fraction"]


@case("learning_rate_negative", "config")
def learning_rate_negative(ctx: Context):
    overrides = {**TRAIN, "bundle_root": ctx.folder("b7"), "learning_rate": "-0.1"}
    return ctx.bundle("training", ["train.json"], overrides), ["learning_rate"]


# ---- checkpoints


def _tiny_network_state(ctx: Context, channels: list[int]) -> dict:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ctx.oct / "train.json"))
    parser["network_def#channels"], parser["network_def#strides"] = channels, [2] * (len(channels) - 1)
    return parser.get_parsed_content("network_def").state_dict()


def _evaluate(ctx: Context, name: str, write: Callable[[Path], None]):
    path = ctx.folder(name) / "model.pt"
    write(path)
    overrides = {**TINY, "bundle_root": ctx.folder(f"{name}_b"), "checkpoint_path": path}
    return ctx.bundle("evaluating", ["train.json", "evaluate.json"], overrides), [str(path)]


@case("checkpoint_not_a_checkpoint", "checkpoint")
def checkpoint_text(ctx: Context):
    return _evaluate(ctx, "c1", lambda p: p.write_text("weights, honestly"))


@case("checkpoint_other_network_size", "checkpoint")
def checkpoint_other_size(ctx: Context):
    return _evaluate(ctx, "c2", lambda p: torch.save(_tiny_network_state(ctx, [8, 16]), p))


@case("checkpoint_other_keys", "checkpoint")
def checkpoint_other_keys(ctx: Context):
    return _evaluate(ctx, "c3", lambda p: torch.save({"encoder.weight": torch.zeros(3)}, p))


# ---- write errors


@contextlib.contextmanager
def mounted(kind: str, folder: Path) -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], check=True)
    else:
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
        subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@case("disk_full_checkpoints", "write")
def disk_full(ctx: Context):
    if os.geteuid() != 0:
        return None, []
    with mounted("tmpfs", ctx.work / "full") as folder:
        overrides = {**TRAIN, "train#trainer#max_epochs": "3", "bundle_root": ctx.folder("w1"), "ckpt_dir": folder}
        return ctx.bundle("training", ["train.json"], overrides), [str(folder)]


@case("read_only_output", "write")
def read_only(ctx: Context):
    if os.geteuid() != 0:
        return None, []
    with mounted("ro", ctx.work / "ro") as folder:
        overrides = {**TRAIN, "bundle_root": ctx.folder("w2"), "output_dir": folder / "run"}
        return ctx.bundle("training", ["train.json"], overrides), [str(folder)]


@case("output_is_a_file", "write")
def output_file(ctx: Context):
    blocker = ctx.folder("w3") / "outputs"
    blocker.write_text("a file")
    overrides = {**TRAIN, "bundle_root": ctx.folder("w3b"), "output_dir": blocker}
    return ctx.bundle("training", ["train.json"], overrides), [str(blocker)]


# ---- the experiments tool and export


@case("register_unknown_run", "experiments")
def register_unknown(ctx: Context):
    return ctx.module("clinseg.pipelines.experiments", "register", "0" * 32), ["0" * 32]


@case("register_not_a_run_id", "experiments")
def register_bad_id(ctx: Context):
    return ctx.module("clinseg.pipelines.experiments", "register", "../../etc"), ["../../etc"]


@case("fetch_unknown_model", "experiments")
def fetch_unknown(ctx: Context):
    out = ctx.work / "fetched"
    return ctx.module("clinseg.pipelines.experiments", "fetch", "no_such_model", "1", "--out", str(out)), [
        "no_such_model"
    ]


@case("unknown_option", "arguments")
def unknown_option(ctx: Context):
    return ctx.module("clinseg.pipelines.experiments", "compare", "oct_layers", "--no_such_option"), [
        "--no_such_option"
    ]


@case("export_missing_checkpoint", "export")
def export_missing(ctx: Context):
    missing = ctx.work / "missing.pt"
    command = [sys.executable, "-m", "clinseg.pipelines.export", "oct_layers", "--checkpoint", str(missing)]
    return ctx.command(command), [str(missing)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=SOURCE_ROOT)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cases", nargs="*", default=None)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="error-matrix-") as work:
        ctx = Context(args.repo.resolve(), Path(work))
        for case_id, (case_class, function) in CASES.items():
            if args.cases and case_id not in args.cases:
                continue
            started = time.perf_counter()
            result, names = function(ctx)
            if result is None:
                rows.append({"case": case_id, "class": case_class, "verdict": "skipped (not root)", "line": ""})
                continue
            outcome, line = verdict(result, names)
            rows.append({"case": case_id, "class": case_class, "verdict": outcome, "status": result.returncode,
                         "line": line[:240], "seconds": round(time.perf_counter() - started, 1)})  # fmt: skip
            print(f"{case_class:11s} {case_id:32s} {outcome:10s} {line[:150]}", flush=True)
    report = {"repo": str(args.repo), "cases": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    counts = {}
    for row in rows:
        counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
