"""nnU-Net v2's own trainer for a wall-time budget. Run by the Python of nnU-Net's environment, never the project's
(it imports nothing of the project); ``clinseg.pipelines.benchmarks.nnunet_side_by_side`` calls it:

    .venv-nnunet/bin/python pipelines/benchmarks/nnunet_budget_training.py DATASET --budget_s 600 --fold all

nnU-Net's plan, network, loss, augmentation and optimizer are used as they are. Only its schedule changes: 1000
epochs of 250 iterations (days on a CPU) become epochs of ``--iterations_per_epoch`` steps, each with nnU-Net's
validation steps and epoch-end bookkeeping, and the number of epochs is set to as many as fit in the budget (after
the first epoch, then again after the second, as the first includes the data loaders' warm-up), so nnU-Net's
polynomial learning-rate decay runs its whole course within it. The loop also stops when the next epoch would end
past the budget. ``checkpoint_final.pth`` is written where ``nnUNetv2_predict``
finds it; the last line printed is a JSON summary (epochs, iterations, seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="nnU-Net dataset id or name (its preprocessed folder must exist)")
    parser.add_argument("--configuration", default="2d")
    parser.add_argument("--fold", default="all", help="'all' trains on every training case, as the benchmark's split")
    parser.add_argument("--budget_s", type=float, required=True, help="wall time of the training loop, in seconds")
    parser.add_argument("--iterations_per_epoch", type=int, default=10)
    parser.add_argument("--val_iterations_per_epoch", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    torch.set_num_threads(os.cpu_count() or 1)  # what nnUNetv2_train -device cpu does
    fold = args.fold if args.fold == "all" else int(args.fold)
    trainer = get_trainer_from_args(args.dataset, args.configuration, fold, device=torch.device("cpu"))
    trainer.num_iterations_per_epoch = args.iterations_per_epoch
    trainer.num_val_iterations_per_epoch = args.val_iterations_per_epoch

    trainer.on_train_start()  # plans the network, the optimizer (poly decay over num_epochs) and the data loaders
    started = time.monotonic()
    epoch_seconds: list[float] = []
    step_seconds: list[float] = []  # a training iteration (batch loading and augmentation included), per epoch
    # nnUNetTrainer.run_training's epoch, with the budget checked between epochs
    while trainer.current_epoch < trainer.num_epochs:
        epoch_started = time.monotonic()
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        steps_started = time.monotonic()
        outputs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(trainer.num_iterations_per_epoch)]
        step_seconds.append((time.monotonic() - steps_started) / trainer.num_iterations_per_epoch)
        trainer.on_train_epoch_end(outputs)
        with torch.no_grad():
            trainer.on_validation_epoch_start()
            outputs = [
                trainer.validation_step(next(trainer.dataloader_val))
                for _ in range(trainer.num_val_iterations_per_epoch)
            ]
            trainer.on_validation_epoch_end(outputs)
        trainer.on_epoch_end()
        epoch_seconds.append(time.monotonic() - epoch_started)
        if len(epoch_seconds) <= 2:
            # the first epoch includes the data loaders' warm-up: the second one sets the count for the rest (it
            # only grows, and the poly decay follows it)
            first, *rest = epoch_seconds
            if rest:
                trainer.num_epochs = max(trainer.num_epochs, 1 + int((args.budget_s - first) // rest[0]))
            else:
                trainer.num_epochs = max(1, int(args.budget_s // first))
            trainer.lr_scheduler.max_steps = trainer.num_epochs
            seconds = ", ".join(f"{e:.1f}" for e in epoch_seconds)
            print(f"nnU-Net budget: epochs of {seconds} s, so {trainer.num_epochs} in all")
        elapsed = time.monotonic() - started
        if elapsed + statistics.median(epoch_seconds) > args.budget_s:
            break
    trainer.on_train_end()
    epochs = len(epoch_seconds)
    summary = {
        "epochs": epochs,
        "iterations": epochs * trainer.num_iterations_per_epoch,
        "training_s": round(time.monotonic() - started, 1),
        "median_epoch_s": round(statistics.median(epoch_seconds), 1),
        "seconds_per_iteration": round(statistics.median(step_seconds), 2),
        "patch_size": list(trainer.configuration_manager.patch_size),
        "batch_size": trainer.configuration_manager.batch_size,
        "parameters": sum(p.numel() for p in trainer.network.parameters()),
        "output_folder": trainer.output_folder,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
