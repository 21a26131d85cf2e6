"""Label-map transforms: colour-coded labels to class indices, and one-hot encoding that keeps ignored pixels."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_numpy, convert_to_tensor

from clinseg.datasets.errors import ConfigError, DataError, source_of
from clinseg.transforms.oct import IGNORE_INDEX


class ColorToLabel(Transform):
    """Map a colour-coded label image ``(H, W, 3|4)`` to class indices ``(H, W)``.

    Args:
        colors: ``colors[k]`` is the RGB colour of class ``k`` (class 0 is usually black background), as
            ``[r, g, b]`` of 8-bit values; an ``[r, g, b, a]`` entry (as a viewer shows an RGBA label's colours) has
            its alpha ignored, as the label's alpha is.

    Raises:
        ValueError: for a table that is not one colour per class (an entry of another length, a value outside
            0..255, a colour twice), and when a pixel has a colour that is not in the table (its colour, count and
            first position are named).
    """

    def __init__(self, colors: Sequence[Sequence[int]]):
        # each entry is read as one colour: a flat reshape would cut RGBA entries into colours that are none of them
        entries = [np.asarray(c).ravel() for c in colors]
        lengths = {len(c) for c in entries}
        if not entries or not lengths <= {3, 4} or len(lengths) > 1:
            raise ValueError(
                f"the colour table must give one [r, g, b] colour per class, got entries of length "
                f"{sorted(lengths)}: {[c.tolist() for c in entries][:10]}."
            )
        table = np.stack(entries)[:, :3]
        if (
            not np.issubdtype(table.dtype, np.number)
            or (table != np.round(table)).any()
            or (table < 0).any()
            or (table > 255).any()
        ):
            raise ValueError(f"the colour table holds values outside the 8-bit range 0..255: {table.tolist()}.")
        self.colors = table.astype(np.int64)
        if len({tuple(c) for c in self.colors}) != len(self.colors):
            raise ValueError(f"the colour table repeats a colour: {self.colors.tolist()}.")

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[-1] not in (3, 4):
            raise ValueError(f"a colour-coded label must be (H, W, 3|4), got shape {rgb.shape}.")
        packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
        table = (self.colors[:, 0] << 16) | (self.colors[:, 1] << 8) | self.colors[:, 2]
        order = np.argsort(table)
        position = np.clip(np.searchsorted(table[order], packed), 0, len(table) - 1)
        known = table[order][position] == packed
        if not known.all():
            rows, cols = np.nonzero(~known)
            first = zip(rows[:1000], cols[:1000], strict=True)
            unknown = sorted({tuple(int(v) for v in rgb[r, c, :3]) for r, c in first})
            raise ValueError(
                f"{int((~known).sum())} pixels have colours outside the class table, e.g. {unknown[:5]} "
                f"(first at row {rows[0]}, column {cols[0]}); known colours: {self.colors.tolist()}."
            )
        return order[position].astype(np.uint8)


class ColorToLabeld(MapTransform):
    """Dictionary wrapper of :class:`ColorToLabel`; adds a leading channel axis."""

    def __init__(self, keys: KeysCollection, colors: Sequence[Sequence[int]], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.converter = ColorToLabel(colors)

    def __call__(self, data: Mapping[Hashable, np.ndarray]) -> dict[Hashable, np.ndarray]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])[None]
        return d


def _like(array: np.ndarray | torch.Tensor, label, **meta) -> NdarrayOrTensor:
    """``array`` with ``label``'s metadata (updated by ``meta``), so later errors can still name the file."""
    if isinstance(label, MetaTensor):
        merged = {**label.meta, **meta}
        merged.pop("palette", None)
        return MetaTensor(torch.as_tensor(array), meta=merged, applied_operations=label.applied_operations)
    return array


class LabelColorsToClassesd(MapTransform):
    """Turn colour-coded label images into class indices with the bundle's colour table ``colors`` (``colors[k]``:
    the RGB colour of class ``k``), by their meaning: a ``(3, rows, cols)`` colour label through the table; a
    palette label (``label_kind`` ``"palette"`` from ``LabelImageReader``) through its palette's colours and the
    table, when a table is given (without one its indices are the classes); class-index labels pass unchanged.

    Raises:
        ConfigError: a table that is not one ``[r, g, b]`` colour per class (naming ``label_colors``).
        DataError: a colour label without a table, or a colour the table lacks (naming the file).
    """

    def __init__(
        self, keys: KeysCollection, colors: Sequence[Sequence[int]] | None = None, allow_missing_keys: bool = False
    ):
        super().__init__(keys, allow_missing_keys)
        try:
            self.converter = ColorToLabel(colors) if colors is not None else None
        except ValueError as e:
            raise ConfigError("label_colors", str(e)) from None

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            meta = label.meta if isinstance(label, MetaTensor) else {}
            kind = meta.get("label_kind", "colour" if np.shape(label)[0] in (3, 4) else "indices")
            if kind == "colour":
                if self.converter is None:
                    raise DataError(
                        source_of(label, "label"),
                        "is a colour-coded label, but no colour table was configured; set 'label_colors' to the "
                        "RGB colour of each class (class 0 first).",
                    )
                rgb = np.moveaxis(convert_to_numpy(label), 0, -1)
            elif kind == "palette" and self.converter is not None:
                rgb = np.asarray(meta["palette"])[convert_to_numpy(label)[0]]
            else:
                continue
            try:
                classes = self.converter(rgb)[None]
            except ValueError as e:
                raise DataError(source_of(label, "label"), f"unknown label colour: {e}") from e
            d[key] = _like(classes, label, label_kind="indices")
        return d


class MaskOutsideFOVd(MapTransform):
    """Give label pixels outside the field of view the ignore value, so the loss and every metric see only the FOV
    (DRIVE's evaluation protocol). Without a FOV mask in the item the label is unchanged (the whole image counts).

    An annotation lies inside its field of view (on DRIVE at most 0.3 % of the vessel pixels fall outside the
    released FOV masks, and 0.05 % outside an estimated one): a label with more than ``max_outside`` of its foreground
    outside is refused, since masking it would leave a plausible label of almost nothing. Its FOV mask is inverted
    (an inverted DRIVE mask still covers 31 % of the image) or belongs to another photograph.

    Raises:
        DataError: naming the FOV mask (or the photograph it was estimated from) and the label.
    """

    def __init__(
        self,
        keys: KeysCollection,
        fov_key: str = "fov",
        ignore_index: int = IGNORE_INDEX,
        max_outside: float = 0.05,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.fov_key, self.ignore_index, self.max_outside = fov_key, ignore_index, max_outside

    def check_inside(self, label: torch.Tensor, inside: torch.Tensor, fov, source_label) -> None:
        foreground = (label != 0) & (label != self.ignore_index)
        count = int(foreground.sum())
        outside = int((foreground & ~inside).sum())
        if count and outside > self.max_outside * count:
            label_file = source_of(source_label, "label")
            raise DataError(
                source_of(fov, self.fov_key),
                f"FOV mask leaves {outside / count:.0%} of the annotated foreground of {label_file} outside "
                f"it ({outside} of {count} pixels; at most {self.max_outside:.0%} expected): it is inverted or another "
                "image's mask.",
            )

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        fov = d.get(self.fov_key)
        if fov is None:
            return d
        for key in self.key_iterator(d):
            label = d[key]
            inside = (convert_to_tensor(fov).reshape(np.shape(label)) > 0).as_subclass(torch.Tensor)
            values = convert_to_tensor(label).as_subclass(torch.Tensor)
            self.check_inside(values, inside, fov, label)
            d[key] = _like(torch.where(inside, values, self.ignore_index).to(torch.uint8), label)
        return d


class OneHotWithIgnore(Transform):
    """One-hot encode a ``(1, ...)`` label map into ``(num_classes, ...)``; ignored pixels get all-zero channels.

    MONAI's metrics and ``DiceLoss`` treat all-zero one-hot pixels as ignored when given a sentinel
    ``ignore_index`` (one outside ``[0, num_classes)``), so unannotated pixels drop out of every score.

    Raises:
        ValueError: for a value that is neither a class index nor ``ignore_index``.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def __call__(self, label: NdarrayOrTensor) -> torch.Tensor:
        label_t = convert_to_tensor(label, track_meta=True)
        if label_t.shape[0] != 1:
            raise ValueError(f"expected a (1, ...) label map, got shape {tuple(label_t.shape)}.")
        values = label_t.long()
        invalid = (values >= self.num_classes) & (values != self.ignore_index) | (values < 0)
        if invalid.any():
            bad = torch.unique(values[invalid]).tolist()[:10]
            raise ValueError(f"label values {bad} are outside the {self.num_classes} classes of this bundle.")
        valid = values != self.ignore_index
        onehot = torch.zeros((self.num_classes, *label_t.shape[1:]), dtype=torch.float32, device=label_t.device)
        onehot.scatter_(0, torch.where(valid, values, 0).as_subclass(torch.Tensor), 1.0)
        onehot *= valid.as_subclass(torch.Tensor)
        if isinstance(label_t, MetaTensor):
            return MetaTensor(onehot, meta=label_t.meta, applied_operations=label_t.applied_operations)
        return onehot


class OneHotWithIgnored(MapTransform):
    """Dictionary wrapper of :class:`OneHotWithIgnore`."""

    def __init__(
        self,
        keys: KeysCollection,
        num_classes: int,
        ignore_index: int = IGNORE_INDEX,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.converter = OneHotWithIgnore(num_classes, ignore_index)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


class MapLabelValues(Transform):
    """Turn the values of a label map into this bundle's class indices: ``value_to_class[v]`` for each listed value,
    ``ignore_index`` for unannotated pixels (kept as they are), 0 (background) for every other value, or an error for
    values not listed when ``strict``. With ``strict``, a label holding nothing but 0 and ``ignore_index`` is refused:
    it is a binary mask stored 0/255, whose foreground would silently count as unannotated.

    A multi-label map (e.g. a whole-body segmentation where 51 is the heart) becomes a binary heart label with
    ``{51: 1}`` and ``strict=False``. With ``value_to_class=None`` the values must already be class indices
    ``0..num_classes-1``, checked when ``num_classes`` is given.

    Raises:
        DataError: naming the file (from the ``MetaTensor``'s ``filename_or_obj``) and the unexpected values.
    """

    def __init__(
        self,
        value_to_class: Mapping[int | str, int] | None = None,
        num_classes: int | None = None,
        strict: bool = True,
        ignore_index: int | None = None,
    ):
        try:
            self.value_to_class = {int(k): int(v) for k, v in (value_to_class or {}).items()}
        except (TypeError, ValueError, AttributeError):
            raise ConfigError(
                "label_values",
                f"{value_to_class!r} is not a mapping of label values to class indices.",
                'Give e.g. {"50": 1, "100": 2}.',
            ) from None
        beyond = sorted({c for c in self.value_to_class.values() if not 0 <= c < (num_classes or 256)})
        if beyond:
            # a class index the network has no channel for would be trained as nothing and scored as a miss
            raise ConfigError("label_values", f"maps to class indices {beyond}, beyond the {num_classes} classes.")
        self.num_classes = num_classes
        self.strict = strict
        self.ignore_index = ignore_index

    def __call__(self, label: NdarrayOrTensor) -> NdarrayOrTensor:
        label_t = convert_to_tensor(label, track_meta=True)
        source = source_of(label_t, "label")
        if not torch.isfinite(label_t).all():
            raise DataError(source, "the label map holds NaN or infinite values.")
        values = torch.unique(label_t).tolist()
        if any(v != int(v) for v in values):
            raise DataError(source, f"label values must be integers, found {[v for v in values if v != int(v)][:5]}.")
        known = set(self.value_to_class) if self.value_to_class else set(range(self.num_classes or 0))
        unknown = sorted(int(v) for v in values if int(v) not in known and int(v) not in (0, self.ignore_index))
        if unknown and (self.strict and (self.value_to_class or self.num_classes)):
            raise DataError(
                source,
                f"label values {unknown[:10]} are not among the classes "
                f"({sorted(known)}); set 'class_names' to this dataset's classes, or map values to classes with "
                f"'label_values' where the bundle has it (e.g. {{\"{unknown[0]}\": 1}}).",
            )
        if (
            self.strict
            and self.ignore_index not in (None, 0)
            and (self.num_classes or 0) > 1
            and self.ignore_index not in known
            and {int(v) for v in values} == {0, self.ignore_index}
        ):
            # a binary mask stored 0/255 would train and score on background alone, its foreground unannotated
            raise DataError(
                source,
                f"holds only the values 0 and {self.ignore_index}, the value of unannotated pixels: its foreground "
                f"would be ignored, not learnt. A binary mask stored 0/{self.ignore_index} must be stored as class "
                f"indices (0/1), or read as a binary mask (the vessels template's BinaryMaskReader).",
            )
        if not self.value_to_class:
            return label_t
        mapped = torch.zeros_like(label_t, dtype=torch.uint8)
        for value, index in self.value_to_class.items():
            mapped[label_t == value] = index
        if self.ignore_index is not None and self.ignore_index not in self.value_to_class:
            mapped[label_t == self.ignore_index] = self.ignore_index  # unannotated stays unannotated, not background
        return mapped


class MapLabelValuesd(MapTransform):
    """Dictionary wrapper of :class:`MapLabelValues`."""

    def __init__(
        self,
        keys: KeysCollection,
        value_to_class: Mapping[int | str, int] | None = None,
        num_classes: int | None = None,
        strict: bool = True,
        ignore_index: int | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.mapper = MapLabelValues(value_to_class, num_classes, strict, ignore_index)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.mapper(d[key])
        return d
