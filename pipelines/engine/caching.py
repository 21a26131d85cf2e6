"""The dataset behind each bundle's loaders: the deterministic preprocessing cached in memory, on disk, or not at all.

MONAI's cache datasets run the transforms up to the first random one once per item and keep the result; only the
random tail runs every epoch. Which store fits depends on the data, so every bundle exposes ``cache``:

- ``"memory"`` (default): :class:`monai.data.CacheDataset`. Fastest; the cached items live in the training
  process, so RAM grows with the dataset (see the README's memory table). ``cache_rate`` < 1 caches only part.
- ``"disk"``: :class:`monai.data.PersistentDataset` under ``cache_dir``. For datasets larger than RAM, and reused
  across runs: bundles put the cache under the dataset's content fingerprint, and the transforms' hash is part of
  each key, so a changed file or a changed preprocessing never reads a stale entry. Entries are written to a
  temporary file and moved into place, so a killed run leaves no half-written entry; several ranks may share one.
- ``"none"``: :class:`monai.data.Dataset`, everything every epoch; the least memory.

``repeats`` > 1 presents the items several times per epoch (several random patches per volume) without caching
them again: the repeats share one cache.
"""

from __future__ import annotations

import os
from typing import Literal

from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import json_hashing
from torch.utils.data import ConcatDataset

from clinseg.datasets.value_types import NonNegativeInt, PositiveInt, Rate
from clinseg.pipelines.cli import ConfigError

CACHE_MODES = ("memory", "disk", "none")


def cached_dataset(
    data: list[dict],
    transform,
    cache: Literal[CACHE_MODES] = "memory",
    cache_dir: str | os.PathLike | None = None,
    cache_rate: Rate = 1.0,
    num_workers: NonNegativeInt = 0,
    repeats: PositiveInt = 1,
    progress: bool = False,
):
    """A dataset over ``data`` with ``transform``, cached as ``cache`` says (see the module's docs).

    ``num_workers`` threads fill a memory cache (0: one); loader workers are set on the DataLoader.
    """
    if cache == "memory":
        dataset = CacheDataset(
            data, transform, cache_rate=cache_rate, num_workers=max(int(num_workers), 1), progress=progress
        )
    elif cache == "disk":
        if cache_dir is None:
            raise ConfigError("cache_dir", "a disk cache needs a folder.")
        # track_meta: the cached items keep their MetaTensor history, which Invertd needs to map predictions back.
        # weights_only=False: torch's weights-only unpickler refuses MetaTensor, so every entry would be taken for
        # corrupt, deleted and recomputed on each read (a disk cache that never serves from disk). The entries are
        # this run's own files under cache_dir, trusted as the bundle config itself is.
        dataset = PersistentDataset(
            data, transform, cache_dir=cache_dir, hash_transform=json_hashing, track_meta=True, weights_only=False
        )
    elif cache == "none":
        dataset = Dataset(data, transform)
    else:
        raise ConfigError("cache", f"is {cache!r}; expected one of {list(CACHE_MODES)}.")
    return dataset if repeats == 1 else ConcatDataset([dataset] * int(repeats))
