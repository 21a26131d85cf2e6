"""Checkpoints identified before they are loaded: a file that is not a checkpoint, another bundle's checkpoint or
one of another network size is one line naming the file and what differs, not PyTorch's size-mismatch text.

The check compares the file's tensors with the objects they would be loaded into (names and shapes), so it needs
nothing written beside the checkpoint: ``models/model.pt`` stays the plain state dict the Model Zoo expects, and
checkpoints written before this check existed are identified the same way.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from monai.handlers import CheckpointLoader as MonaiCheckpointLoader

from clinseg.datasets.errors import DataError

HINT = (
    "A checkpoint of another bundle, or of this bundle trained with other network settings (network_def#channels, "
    "#strides, in/out channels, class_names, channels)? Point --checkpoint_path at this bundle's own models/model.pt "
    "or pass the network settings it was trained with."
)


def read_checkpoint(path: str | os.PathLike, map_location=None) -> object:
    """``torch.load`` of a checkpoint (weights only), every failure a :class:`DataError` naming the file."""
    path = Path(path)
    if path.is_dir():
        raise DataError(path, "is a folder; expected a checkpoint file (.pt).")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as e:
        raise DataError(path, "does not exist.") from e
    except PermissionError as e:
        raise DataError(path, "cannot be read (no permission).") from e
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(path, f"is not a PyTorch checkpoint (empty, truncated or another kind of file): {first}") from e


def shape_differences(expected: Mapping[str, torch.Tensor], found: Mapping[str, object]) -> list[str]:
    """What keeps ``found`` (a state dict read from a file) from loading into a module whose state is ``expected``."""
    problems = []
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    other_shape = [
        k
        for k in expected
        if k in found and isinstance(found[k], torch.Tensor) and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    if other_shape:
        k = other_shape[0]
        problems.append(
            f"{len(other_shape)} of its tensors have other shapes (e.g. {k!r} is {list(found[k].shape)} in the file, "
            f"{list(expected[k].shape)} in this bundle's network)"
        )
    if missing:
        problems.append(f"{len(missing)} tensors of this bundle's network are missing (e.g. {missing[0]!r})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors are not in this bundle's network (e.g. {unexpected[0]!r})")
    return problems


def check_state_dict(path: str | os.PathLike, module: torch.nn.Module, state: object, what: str = "model") -> None:
    """Raise a one-line :class:`DataError` naming ``path`` when ``state`` cannot load into ``module``."""
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        kind = type(state).__name__
        raise DataError(path, f"holds a {kind}, not the state dict of a {what}.", HINT)
    problems = shape_differences(module.state_dict(), state)
    if problems:
        raise DataError(path, f"does not fit this bundle's {what}: " + "; ".join(problems) + ".", HINT)


def model_state(checkpoint: object) -> object:
    """The network's state in a bundle checkpoint: the file itself (``models/model.pt``) or its ``"model"`` entry
    (a training checkpoint with optimizer and trainer state)."""
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model"), Mapping):
        return checkpoint["model"]
    return checkpoint


def load_network_weights(network: torch.nn.Module, path: str | os.PathLike, map_location="cpu") -> torch.nn.Module:
    """Load a bundle checkpoint into ``network`` after checking that it fits; returns ``network``."""
    state = model_state(read_checkpoint(path, map_location))
    check_state_dict(path, network, state)
    network.load_state_dict(state)
    return network


class CheckpointLoader(MonaiCheckpointLoader):
    """MONAI's ``CheckpointLoader`` that first identifies the file: it must be a checkpoint, and every module of
    ``load_dict`` must find tensors of its own names and shapes in it; otherwise one line names the file and what
    differs (a training checkpoint resumed with other network settings, another bundle's ``model.pt``)."""

    def __call__(self, engine) -> None:
        from clinseg.pipelines.engine.ensembles import ProbabilityEnsemble, checkpoint_paths

        paths = checkpoint_paths(self.load_path)
        if len(paths) > 1:  # an ensemble: each member from its own file, each checked
            ensembles = [m for m in self.load_dict.values() if isinstance(m, ProbabilityEnsemble)]
            if len(ensembles) != 1 or len(ensembles[0].members) != len(paths):
                raise DataError(paths[0], f"is one of {len(paths)} checkpoints; the network is no ensemble of as many.")
            for member, path in zip(ensembles[0].members, paths, strict=True):
                load_network_weights(member, path, self.map_location)
            return
        self.load_path = paths[0]  # one checkpoint, possibly given as a list of one
        checkpoint = read_checkpoint(self.load_path, self.map_location)
        if isinstance(checkpoint, Mapping):
            single = len(self.load_dict) == 1 and next(iter(self.load_dict)) not in checkpoint
            for key, obj in self.load_dict.items():
                if not isinstance(obj, torch.nn.Module):
                    continue
                if isinstance(obj, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
                    obj = obj.module  # ignite saves and loads the wrapped module's state, without 'module.'

                state = checkpoint if single else checkpoint.get(key)
                if state is None:
                    raise DataError(self.load_path, f"has no {key!r} entry; entries: {sorted(map(str, checkpoint))}.")
                if self.strict_shape:
                    check_state_dict(self.load_path, obj, state, key)
        else:
            raise DataError(self.load_path, f"holds a {type(checkpoint).__name__}, not a checkpoint.", HINT)
        super().__call__(engine)
