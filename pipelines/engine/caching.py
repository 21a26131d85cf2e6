"""The dataset behind each bundle's loaders: the deterministic preprocessing cached in memory, on disk, or not at all.

MONAI's cache datasets run the transforms up to the first random one once per item and keep the result; only the
random tail runs every epoch. Which store fits depends on the data, so every bundle exposes ``cache``:

- ``"memory"`` (default): :class:`monai.data.CacheDataset`. Fastest; the cached items live in the training
  process, so RAM grows with the dataset (see the README's memory table). ``cache_rate`` < 1 caches only part.
- ``"disk"``: :class:`monai.data.PersistentDataset` under ``cache_dir``. For datasets larger than RAM, and reused
  across runs: bundles put the cache under the dataset's content fingerprint, and the hash of the cached
  transforms *with their settings* (:func:`transform_settings_hashing`) is part of each key, so a changed file or
  a changed preprocessing never reads a stale entry. Entries are written to a
  temporary file beside them and renamed into place (:class:`AtomicPersistentDataset`), so a killed run or a full
  disk leaves no half-written entry, and an entry that cannot be read back is computed again; several ranks may
  share one.
- ``"none"``: :class:`monai.data.Dataset`, everything every epoch; the least memory.

``repeats`` > 1 presents the items several times per epoch (several random patches per volume) without caching
them again: the repeats share one cache.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import types
from collections.abc import Mapping
from copy import deepcopy
from functools import partial
from typing import Literal

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import SUPPORTED_PICKLE_MOD
from monai.utils import convert_to_tensor, look_up_option
from torch.utils.data import ConcatDataset

from clinseg.datasets.value_types import NonNegativeInt, PositiveInt, Rate
from clinseg.pipelines.cli import ConfigError

logger = logging.getLogger(__name__)
CACHE_MODES = ("memory", "disk", "none")
_MAX_DEPTH = 12  # transforms nest a few levels (Compose, loader, reader); deeper is a cycle or a model, not a setting


def _settings_of(value, depth: int = 0, seen: frozenset = frozenset()):
    """A JSON description of ``value`` that holds every setting it carries: its type and, for an object, its
    attributes, recursively (arrays by their content's SHA-256). Two transforms that would preprocess differently
    differ here; two built from the same config in two processes do not (no memory addresses)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return f"{type(value).__qualname__}.{value.name}"
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (torch.dtype, np.dtype, torch.device, type)):
        return str(value)
    if isinstance(value, (np.ndarray, torch.Tensor)):
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        return {"array": str(array.dtype), "shape": list(array.shape),
                "sha256": hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()}  # fmt: skip
    if isinstance(value, (types.FunctionType, types.MethodType, types.BuiltinFunctionType, partial)):
        return _callable_settings(value, depth, seen)
    if depth >= _MAX_DEPTH or id(value) in seen:
        return type(value).__qualname__
    seen = seen | {id(value)}
    if isinstance(value, Mapping):
        return {str(k): _settings_of(v, depth + 1, seen) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_settings_of(v, depth + 1, seen) for v in items]
    if isinstance(value, np.random.RandomState):  # a random transform's generator is state, not a setting
        return "RandomState"
    attributes = getattr(value, "__dict__", None)
    if attributes is not None:
        return {f"{type(value).__module__}.{type(value).__qualname__}": _settings_of(attributes, depth + 1, seen)}
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _callable_settings(function, depth: int, seen: frozenset):
    """A function by its qualified name and, since two lambdas share the name ``<lambda>``, its compiled code."""
    if isinstance(function, partial):
        return {"partial": _callable_settings(function.func, depth, seen),
                "args": _settings_of(function.args, depth + 1, seen),
                "keywords": _settings_of(function.keywords, depth + 1, seen)}  # fmt: skip
    if isinstance(function, types.MethodType):
        return {"method": function.__func__.__qualname__, "of": _settings_of(function.__self__, depth + 1, seen)}
    name = f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', repr(function))}"
    code = getattr(function, "__code__", None)
    if code is None:
        return name
    consts = [c for c in code.co_consts if isinstance(c, (bool, int, float, str, bytes, type(None)))]
    return {"function": name, "code": hashlib.sha256(code.co_code + repr(consts).encode()).hexdigest()}


def transform_settings_hashing(transforms) -> bytes:
    """The hash :class:`~monai.data.PersistentDataset` puts in every cache entry's name: of the cached
    (deterministic) transforms *with their settings*. MONAI's ``json_hashing`` cannot encode a transform and then
    hashes the transforms' class names alone, so a CLAHE run would read the entries of a run without CLAHE, and an
    image size of 32 x 48 the entries of 64 x 96: a model trained on other inputs than its config says."""
    description = json.dumps(_settings_of(list(transforms)), sort_keys=True, default=str)
    return hashlib.sha256(description.encode("utf-8")).hexdigest().encode("utf-8")


class AtomicPersistentDataset(PersistentDataset):
    """MONAI's :class:`~monai.data.PersistentDataset` whose entries are written atomically in the cache folder
    itself, and whose unreadable entries are computed again.

    MONAI saves an entry in a temporary folder of the system's (``$TMPDIR``) and moves it into the cache. Where the
    two are on different file systems (a tmpfs ``/tmp``, a cache on another disk or a network share), the move is
    a copy into the entry's final name: a run killed during it, or a disk that fills up, leaves a truncated entry,
    which every later run sharing the cache then fails to read with torch's zip error ("failed finding central
    directory", or a bare "Invalid argument"), naming no file. MONAI recomputes only the entries whose error says
    "Invalid magic number".
    """

    def _cachecheck(self, item_transformed):
        if self.cache_dir is None:
            return super()._cachecheck(item_transformed)
        from clinseg.datasets.io import atomic_write

        name = self.hash_func(item_transformed).decode("utf-8") + self.transform_hash
        entry = self.cache_dir / f"{name}.pt"
        if entry.is_file():
            try:
                return torch.load(entry, weights_only=self.weights_only)
            except PermissionError:
                raise
            except Exception as error:  # noqa: BLE001 - any unreadable entry is only a cache miss
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                logger.warning(f"{entry}: the cache entry cannot be read ({first}); it is computed again")
        item = self._pre_transform(deepcopy(item_transformed))  # the original stays as it was hashed
        stored = convert_to_tensor(item, convert_numeric=False, track_meta=self.track_meta)
        pickle_module = look_up_option(self.pickle_module, SUPPORTED_PICKLE_MOD)
        atomic_write(
            entry,
            lambda tmp: torch.save(stored, tmp, pickle_module=pickle_module, pickle_protocol=self.pickle_protocol),
        )
        return item


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
        dataset = AtomicPersistentDataset(
            data,
            transform,
            cache_dir=cache_dir,
            hash_transform=transform_settings_hashing,
            track_meta=True,
            weights_only=False,
        )
    elif cache == "none":
        dataset = Dataset(data, transform)
    else:
        raise ConfigError("cache", f"is {cache!r}; expected one of {list(CACHE_MODES)}.")
    return dataset if repeats == 1 else ConcatDataset([dataset] * int(repeats))
