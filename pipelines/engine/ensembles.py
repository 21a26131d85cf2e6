"""Several trained models of one bundle used as one: their class probabilities averaged.

The members are the folds of a cross-validation (``python -m clinseg.pipelines.experiments cv``) or trainings with
other seeds. A bundle's configs take an ensemble where they take one checkpoint: ``--checkpoint_path
"['fold0/model.pt','fold1/model.pt',...]"``; the network becomes a :class:`ProbabilityEnsemble` of as many copies
of ``network_def``, each loaded (and checked) from its own file by the bundle's ``CheckpointLoader``.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch

# floor of an averaged probability before its logarithm: keeps log finite, far below any threshold that matters
PROBABILITY_FLOOR = 1e-7

logger = logging.getLogger(__name__)


def checkpoint_paths(checkpoint_path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The checkpoint files of one model or of an ensemble (a list of files), as a list."""
    if isinstance(checkpoint_path, (str, os.PathLike)):
        return [os.fspath(checkpoint_path)]
    return [os.fspath(path) for path in checkpoint_path]


def training_label_range(checkpoint_path, name: str) -> dict | None:
    """The range of a statistic of the training labels (``name``, e.g. ``"retina_height"``:
    :func:`clinseg.transforms.oct.retina_heights`) that the model's ``model.json`` records under
    ``training_labels``; for an ensemble, the range of all its members': the smallest minimum, the largest maximum,
    the median of the medians. None where a member has no record of it (a training checkpoint, or a model trained
    before it was kept): nothing is checked against it, and the log says so."""
    from clinseg.pipelines.runs import record_of

    ranges = []
    for path in checkpoint_paths(checkpoint_path):
        recorded = ((record_of(path) or {}).get("training_labels") or {}).get(name)
        if not isinstance(recorded, dict):
            logger.info(f"{path}: its model.json records no {name} of its training labels: inputs are not checked "
                        "against it")  # fmt: skip
            return None
        ranges.append(recorded)
    return {
        "min": min(r["min"] for r in ranges),
        "median": float(np.median([r["median"] for r in ranges])),
        "max": max(r["max"] for r in ranges),
        "cases": sum(r["cases"] for r in ranges),
    }


def require_unseen(checkpoint_path, datalist: Sequence[dict]):
    """``checkpoint_path``, unless a model of it was trained on images being evaluated.

    Training records the digests of its images in ``model.json`` (``training_images``). An evaluation whose data
    list holds any of them, under any name or in any folder (another split of a grown folder, ``--eval_split all``,
    a copy), would score a model on what it learnt, and report a plausible, too high score.

    Raises:
        ConfigError: naming ``checkpoint_path``, how many of the images, and a few of them.
    """
    from clinseg.datasets.fingerprint import image_digests
    from clinseg.pipelines.cli import ConfigError
    from clinseg.pipelines.runs import record_of

    evaluated = None
    for path in checkpoint_paths(checkpoint_path):
        record = record_of(path) or {}
        trained_on = set(record.get("training_images") or [])
        if not trained_on:
            continue  # a model trained before this was recorded, or not by a bundle: nothing to compare with
        evaluated = evaluated if evaluated is not None else image_digests(datalist)
        seen = sorted(name for digest, name in evaluated.items() if digest in trained_on)
        if seen:
            shown = ", ".join(seen[:5]) + (", ..." if len(seen) > 5 else "")
            raise ConfigError(
                "checkpoint_path",
                f"{path} was trained on {len(seen)} of the {len(evaluated)} images to evaluate ({shown}): its scores "
                "on them would be too high.",
                "Evaluate on images it did not train on: the split it was validated on (--eval_split val with the "
                "training's dataset and split settings), --eval_split test, or --dataset_dir a folder of other cases.",
            )
    return checkpoint_path


class ProbabilityEnsemble(torch.nn.Module):
    """The mean of the members' softmax probabilities, returned as its logarithm.

    The bundles' post-processing applies softmax to what the network returns, and softmax(log p) = p for
    probabilities that sum to one, so an ensemble passes through the same inferers, test-time augmentation and
    post-processing as one network, and its probabilities are the average of the members' (as nnU-Net ensembles
    its folds). Averaging probabilities, not logits, keeps one over-confident member from outvoting the others.
    """

    def __init__(self, members: Sequence[torch.nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}.")
        self.members = torch.nn.ModuleList(members)
        self.probability_floor = PROBABILITY_FLOOR  # an attribute, so that TorchScript (a Deploy app) keeps it

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        # written so that torch.jit.script compiles it: no Optional accumulator, no global
        total = torch.zeros(0)
        first = True
        for member in self.members:
            probability = torch.softmax(member(inputs).float(), dim=1)
            if first:
                total, first = probability, False
            else:
                total = total + probability
        return torch.log((total / len(self.members)).clamp_min(self.probability_floor))


def network_for(network_def: torch.nn.Module, checkpoint_path) -> torch.nn.Module:
    """``network_def`` itself for one checkpoint; a :class:`ProbabilityEnsemble` of one copy per file for several."""
    paths = checkpoint_paths(checkpoint_path)
    if len(paths) == 1:
        return network_def
    return ProbabilityEnsemble([copy.deepcopy(network_def) for _ in paths])


def evaluable(checkpoint_path, eval_split: str):
    """``checkpoint_path``, unless it is an ensemble of cross-validation folds evaluated on a split of their own data.

    Fold models were validated on different cases (their ``model.json`` validation fingerprints differ), so each
    trained on what the others validated: no ``train`` or ``val`` split of that dataset is unseen by all members,
    and its score would be too high without a word. Such an ensemble is evaluated on held-out cases only.

    Raises:
        ConfigError: naming ``checkpoint_path``.
    """
    from clinseg.pipelines.cli import ConfigError
    from clinseg.pipelines.runs import provenance

    paths = checkpoint_paths(checkpoint_path)
    if len(paths) < 2 or eval_split not in ("train", "val"):
        return checkpoint_path
    validated_on = {provenance(path).get("training_validation_fingerprint") for path in paths}
    if len(validated_on - {None}) > 1:
        raise ConfigError(
            "checkpoint_path",
            f"its {len(paths)} models were validated on different cases (cross-validation folds): each trained on "
            f"what the others validated, so the '{eval_split}' split is no unseen data for the ensemble.",
            "Evaluate it on held-out cases: --eval_split test, or --dataset_dir a folder of other cases with "
            "--eval_split all.",
        )
    return checkpoint_path
