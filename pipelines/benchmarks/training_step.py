"""How fast a bundle's training step runs on this machine, and how close that is to what the machine can do.

    python -m clinseg.pipelines.benchmarks.training_step --bundle vessels --out data/benchmarks/training_step.json

1. Builds the bundle's own network, loss and optimizer from its ``train.json`` (MONAI's ``ConfigParser``, the
   defaults or ``--override KEY=JSON``) and a batch of the config's shape (``batch_size`` images times their
   ``patches_per_image`` patches of ``patch_size``, random values: the step's cost does not depend on them).
2. Counts the floating-point operations of one training step (forward, loss, backward) with PyTorch's
   ``FlopCounterMode``.
3. Times the step, after warm-up, in each variant: float32 (the default), ``channels_last`` memory format,
   bfloat16 autocast, each with every thread count up to the machine's cores, and ``torch.compile`` with
   ``--compile`` (its compilation time reported apart).
4. Measures the dense-matmul peak the same way (a square float32, and bfloat16, matrix product), so each variant's
   achieved GFLOP/s is also given as a fraction of what this CPU does on the kernel it is best at.

Prints a table and writes everything as JSON. Run it alone: a benchmark beside another job measures nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from clinseg.pipelines.benchmarks import write_report
from clinseg.pipelines.cli import parse_overrides
from clinseg.pipelines.paths import PROJECT_ROOT, SOURCE_ROOT


def build(bundle: str, overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(SOURCE_ROOT / "bundles" / bundle / "configs" / "train.json"))
    parser.update(overrides)
    network = parser.get_parsed_content("network_def")
    loss = parser.get_parsed_content("loss")
    in_channels = network.in_channels if hasattr(network, "in_channels") else parser["network_def"]["in_channels"]
    size = (
        parser.get_parsed_content("patch_size") if "patch_size" in parser else parser.get_parsed_content("image_size")
    )
    batch = int(parser.get_parsed_content("batch_size"))
    for samples in ("patches_per_image", "patches_per_volume"):  # each image gives this many patches to a batch
        if samples in parser:
            batch *= int(parser.get_parsed_content(samples))
    num_classes = int(parser.get_parsed_content("num_classes"))
    lr = float(parser.get_parsed_content("learning_rate"))
    return network, loss, (batch, in_channels, *size), num_classes, lr


def step_function(network, loss, optimizer, images, labels, memory_format, autocast: bool):
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
        with context:
            output = network(images.contiguous(memory_format=memory_format))
            value = loss(output.float(), labels)
        value.backward()
        optimizer.step()

    return step


def step_flops(network, loss, images, labels) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        loss(network(images), labels).backward()
    network.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def seconds_per_call(function, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]  # the median: a stray slow call (the OS, a page fault) does not count


def matmul_peak(threads: int, dtype: torch.dtype, n: int = 2048) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds = seconds_per_call(lambda: torch.mm(a, b), warmup=2, repeats=7)
    return 2 * n**3 / seconds / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="vessels")
    parser.add_argument("--override", nargs="*", default=[], help="config overrides KEY=JSON, as at training")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "data" / "benchmarks" / "training_step.json"))
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    network, loss, shape, num_classes, lr = build(args.bundle, parse_overrides(args.override))
    images = torch.randn(*shape)
    labels = torch.randint(0, num_classes, (shape[0], 1, *shape[2:])).float()
    flops = step_flops(network, loss, images, labels)
    print(f"{args.bundle}: batch {list(shape)}, {flops / 1e9:.2f} GFLOP per training step")

    cores = os.cpu_count() or 1
    thread_counts = sorted({1, cores})
    peaks = {
        f"{name}_{threads}_threads": matmul_peak(threads, dtype)
        for threads in thread_counts
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))
    }
    variants = {
        "float32": (torch.contiguous_format, False),
        "channels_last": (torch.channels_last, False),
        "bfloat16_autocast": (torch.contiguous_format, True),
    }
    rows = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for name, (memory_format, autocast) in variants.items():
            net = network.to(memory_format=memory_format)
            optimizer = torch.optim.Adam(net.parameters(), lr=lr)
            step = step_function(net, loss, optimizer, images, labels, memory_format, autocast)
            seconds = seconds_per_call(step, warmup=3, repeats=args.repeats)
            peak = peaks[f"{'bfloat16' if autocast else 'float32'}_{threads}_threads"]
            rows.append(
                {
                    "variant": name,
                    "threads": threads,
                    "step_s": round(seconds, 4),
                    "gflops_per_s": round(flops / seconds / 1e9, 2),
                    "matmul_peak_gflops_per_s": round(peak, 2),
                    "fraction_of_peak": round(flops / seconds / 1e9 / peak, 3),
                }
            )
            print(
                f"  {name:18s} {threads} thread(s): {seconds * 1000:7.1f} ms/step, "
                f"{rows[-1]['gflops_per_s']:6.1f} GFLOP/s, {rows[-1]['fraction_of_peak']:.2f} of the matmul peak"
            )
        network = network.to(memory_format=torch.contiguous_format)
    if args.compile:
        torch.set_num_threads(cores)
        compiled = torch.compile(network)
        optimizer = torch.optim.Adam(network.parameters(), lr=lr)
        step = step_function(compiled, loss, optimizer, images, labels, torch.contiguous_format, False)
        start = time.perf_counter()
        step()
        compile_s = time.perf_counter() - start
        seconds = seconds_per_call(step, warmup=2, repeats=args.repeats)
        rows.append(
            {
                "variant": "torch_compile",
                "threads": cores,
                "step_s": round(seconds, 4),
                "compile_s": round(compile_s, 1),
                "gflops_per_s": round(flops / seconds / 1e9, 2),
                "matmul_peak_gflops_per_s": round(peaks[f"float32_{cores}_threads"], 2),
                "fraction_of_peak": round(flops / seconds / 1e9 / peaks[f"float32_{cores}_threads"], 3),
            }
        )
        print(f"  torch_compile      {cores} thread(s): {seconds * 1000:7.1f} ms/step (compiled in {compile_s:.0f} s)")
    fastest = min(rows, key=lambda row: row["step_s"])
    report = {
        "bundle": args.bundle,
        "overrides": args.override,
        "batch_shape": list(shape),
        "gflop_per_step": round(flops / 1e9, 3),
        "matmul_peak_gflops_per_s": {k: round(v, 2) for k, v in peaks.items()},
        "variants": rows,
        "fastest": fastest,
        "machine": {"cpu_count": cores, "processor": platform.processor(), "torch": torch.__version__},
    }
    print(f"fastest: {fastest['variant']} with {fastest['threads']} thread(s), {fastest['step_s'] * 1000:.1f} ms/step")
    write_report(Path(args.out), report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
