"""Peak memory and time of each bundle's default training config, per cache mode: the numbers behind the README's
memory ceilings.

    python -m clinseg.pipelines.benchmarks.memory [--bundles oct_layers vessels ct_heart] [--caches memory disk none]
        [--epochs 1] [--dataset_sizes N ...] [--out data/benchmarks/memory.json] [--override KEY=JSON ...]

Each measurement is a fresh process that runs ``training`` of ``bundles/<bundle>/configs/train.json`` in-process
(as ``python -m monai.bundle run training`` does) on the bundle's embedded default data, with validation every
epoch, into a temporary bundle root and MLflow store (the project's models and ``mlruns/`` are not touched). It
reports the process's peak resident memory (and that of its largest DataLoader worker, when ``num_workers`` > 0),
the peak proportional memory of the process with all its workers (what the machine must hold: pages the workers
share with the main process counted once), the wall time, and the size of the preprocessed (cached) items, read
from the disk cache: that is what ``cache: memory`` holds in RAM.

``--dataset_sizes`` measures each 2D bundle on phantoms of those sizes (images for vessels, subjects for
oct_layers) generated into the temporary folder: with ``cache: disk`` the peak must not grow with the dataset, since
data lists hold paths and each item is decoded only when a Dataset needs it.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clinseg.pipelines.cli import parse_overrides
from clinseg.pipelines.paths import PROJECT_ROOT, SOURCE_ROOT

BUNDLES = ("oct_layers", "vessels", "ct_heart")
CACHES = ("memory", "disk", "none")


def write_phantom(bundle: str, folder: Path, size: int) -> None:
    """A phantom dataset of ``size`` images (vessels) or subjects (oct_layers) in ``folder``."""
    if bundle == "vessels":
        from clinseg.datasets.fundus.phantom import write_drive_layout

        write_drive_layout(folder, n_images=size)
    elif bundle == "oct_layers":
        from clinseg.datasets.oct.phantom import write_phantom_dataset

        write_phantom_dataset(folder, n_subjects=size)
    else:
        raise SystemExit(f"--dataset_sizes is for the 2D bundles (vessels, oct_layers), not {bundle}.")


def child(bundle: str, overrides: dict) -> None:
    """Run one training in this process and print its peak RSS as the last line (JSON)."""
    from monai.bundle import run

    start = time.perf_counter()
    run("training", config_file=str(SOURCE_ROOT / "bundles" / bundle / "configs" / "train.json"), **overrides)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # DataLoader workers are child processes: the largest of them (each also holds its copy-on-write pages)
    worker_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    record = {"peak_rss_mib": round(peak_mib, 1), "wall_s": round(time.perf_counter() - start, 1)}
    if worker_mib:
        record["largest_worker_rss_mib"] = round(worker_mib, 1)
    print(json.dumps(record))


def tree_pss_mib(pid: int) -> float:
    """Proportional set size of a process and all its descendants (Linux ``/proc``; 0 elsewhere): shared pages
    counted once in total, unlike RSS, which counts a forked DataLoader worker's inherited pages again."""
    total_kib, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kib += int(line.split()[1])
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
            continue  # the process ended meanwhile
    return total_kib / 1024


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def measure(bundle: str, cache: str, epochs: int, extra: dict, dataset_size: int | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"memory-{bundle}-") as tmp:
        root = Path(tmp) / "bundle"
        if dataset_size is not None:
            write_phantom(bundle, Path(tmp) / "data", dataset_size)
            extra = {**extra, "dataset_dir": str(Path(tmp) / "data")}
        overrides = {
            "bundle_root": str(root),
            "tracking_uri": f"sqlite:///{tmp}/mlflow.db",
            "cache": cache,
            "train#trainer#max_epochs": epochs,
            "val_interval": 1,
            **extra,
        }
        command = [
            sys.executable,
            "-m",
            "clinseg.pipelines.benchmarks.memory",
            "--child",
            bundle,
            json.dumps(overrides),
        ]
        with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
            process = subprocess.Popen(command, cwd=SOURCE_ROOT, stdout=stdout, stderr=stderr, text=True)
            peak_pss = 0.0
            while process.poll() is None:
                peak_pss = max(peak_pss, tree_pss_mib(process.pid))
                time.sleep(0.25)
            stdout.seek(0), stderr.seek(0)
            if process.returncode != 0:
                raise SystemExit(f"{bundle} ({cache}) failed:\n{stderr.read()[-4000:]}")
            record = json.loads(stdout.read().strip().splitlines()[-1])
        if peak_pss:
            record["peak_pss_all_processes_mib"] = round(peak_pss, 1)
        cache_root = root / "cache"
        if cache == "disk" and cache_root.is_dir():
            files = [p for p in cache_root.rglob("*.pt")]
            record["cached_items"] = len(files)
            record["cache_mib"] = round(folder_mib(cache_root), 1)
            record["mib_per_item"] = round(record["cache_mib"] / max(len(files), 1), 2)
    size = {} if dataset_size is None else {"dataset_size": dataset_size}
    return {"bundle": bundle, "cache": cache, "epochs": epochs, **size, **record}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundles", nargs="+", default=list(BUNDLES), choices=BUNDLES)
    parser.add_argument("--caches", nargs="+", default=list(CACHES), choices=CACHES)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=JSON")
    parser.add_argument("--dataset_sizes", nargs="+", type=int, default=[None], metavar="N")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "data" / "benchmarks" / "memory.json")
    parser.add_argument("--child", nargs=2, metavar=("BUNDLE", "OVERRIDES_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], json.loads(args.child[1]))
        return

    extra = parse_overrides(args.override)
    records = []
    print(f"{'bundle':<12} {'cache':<7} {'size':>5} {'peak RSS MiB':>12} {'all procs PSS':>13} {'wall s':>7} "
          f"{'cached items':>12} {'MiB/item':>9}")  # fmt: skip
    for bundle in args.bundles:
        for cache in args.caches:
            for size in args.dataset_sizes:
                record = measure(bundle, cache, args.epochs, extra, size)
                records.append(record)
                print(
                    f"{bundle:<12} {cache:<7} {size or '':>5} {record['peak_rss_mib']:>12.0f} "
                    f"{record.get('peak_pss_all_processes_mib', 0):>13.0f} {record['wall_s']:>7.1f} "
                    f"{record.get('cached_items', ''):>12} {record.get('mib_per_item', ''):>9}"
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": {"platform": platform.platform(), "python": platform.python_version()}, "runs": records}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
