"""OCT-specific transforms: layer boundaries (one row position per A-scan) to a layer label map, the anatomical
order of the layers in every column, the retina's height against the one the model learnt, and speckle-like
augmentation."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import Compose, InvertibleTransform, MapTransform, RandomizableTransform, Transform
from monai.utils import MetaKeys, TraceKeys, TransformBackends, convert_to_numpy

from clinseg.datasets.errors import ConfigError, DataError, source_of
from clinseg.datasets.oct.bscans import MIN_BSCAN_SIZE, padding_rows
from clinseg.datasets.oct.duke import crossing_columns
from clinseg.datasets.value_types import AtLeastOne

IGNORE_INDEX = 255
"""Label value of pixels without annotation (masked out of the loss and the metrics)."""


def boundaries_to_label_map(boundaries: np.ndarray, height: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Fill the layers between consecutive boundaries.

    Args:
        boundaries: ``(n_boundaries, width)`` row positions (0-based, sub-pixel allowed) of each boundary in each
            column, top to bottom; NaN where the boundary is not annotated.
        height: number of rows of the B-scan.
        ignore_index: value given to every pixel of a column in which any boundary is missing, or in which a
            boundary lies more than ``CROSSING_TOLERANCE`` rows above the one before it (the two cross: which layer
            lies between them cannot be told). Such columns are not guessed: they are excluded from training and
            evaluation. A boundary less far above the one before touches it (that layer is absent there).

    Returns:
        ``(height, width)`` uint8 map: 0 above the first and below the last boundary, ``k`` between boundary
        ``k-1`` and boundary ``k`` (so ``n_boundaries - 1`` layer classes), ``ignore_index`` in unannotated columns.
    """
    boundaries = np.asarray(boundaries, dtype=np.float64)
    if boundaries.ndim != 2 or boundaries.shape[0] < 2:
        raise ValueError(f"boundaries must have shape (n_boundaries>=2, width), got {boundaries.shape}.")
    n_boundaries = boundaries.shape[0]
    if n_boundaries > ignore_index:
        raise ValueError(f"{n_boundaries} boundaries give more classes than the ignore value {ignore_index} allows.")
    unannotated = np.isnan(boundaries).any(axis=0) | crossing_columns(boundaries)
    # filled one layer after another, a boundary drawn above the one before would let the later layer overwrite the
    # earlier: a slip within the tolerance becomes touching, a larger crossing leaves the column unannotated
    boundaries = np.fmax.accumulate(boundaries, axis=0)
    rows = np.arange(height, dtype=np.float64)[:, None]
    label = np.zeros((height, boundaries.shape[1]), dtype=np.uint8)
    # a pixel whose centre lies at or below boundary k-1 and above boundary k belongs to layer k
    for k in range(1, n_boundaries):
        with np.errstate(invalid="ignore"):
            inside = (rows >= boundaries[k - 1][None]) & (rows < boundaries[k][None])
        label[inside] = k
    label[:, unannotated] = ignore_index
    return label


class BoundariesToLabelMap(Transform):
    """Array transform: ``(n_boundaries, width)`` boundary rows to a ``(1, height, width)`` label map."""

    def __init__(self, height: int, ignore_index: int = IGNORE_INDEX):
        self.height = height
        self.ignore_index = ignore_index

    def __call__(self, boundaries: np.ndarray) -> np.ndarray:
        return boundaries_to_label_map(boundaries, self.height, self.ignore_index)[None]


class BoundariesToLabelMapd(MapTransform):
    """Dictionary wrapper of :class:`BoundariesToLabelMap`: each key's boundaries (``label_kind`` ``"boundaries"`` in
    the metadata, as ``DukeMatReader`` gives them) become a label map with the rows of ``image_key``; labels that are
    already label maps pass unchanged, so one pipeline serves boundary and label-image layouts."""

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        ignore_index: int = IGNORE_INDEX,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.ignore_index = ignore_index

    def __call__(self, data: Mapping[Hashable, np.ndarray]) -> dict[Hashable, np.ndarray]:
        d = dict(data)
        height = np.shape(d[self.image_key])[-2]
        converter = BoundariesToLabelMap(height, self.ignore_index)
        for key in self.key_iterator(d):
            boundaries = d[key]
            meta = getattr(boundaries, "meta", None)
            if meta is not None and meta.get("label_kind") != "boundaries":
                continue
            label = converter(convert_to_numpy(boundaries))
            if meta is not None:
                meta = {**meta, "label_kind": "indices", MetaKeys.SPATIAL_SHAPE: np.asarray(label.shape[1:])}
                label = MetaTensor(torch.as_tensor(label), meta=meta)
            d[key] = label
        return d


def order_layers(scores: np.ndarray) -> np.ndarray:
    """The label map that best agrees with per-pixel class ``scores`` among those in anatomical order.

    A B-scan holds, in every column (A-scan) from top to bottom: background (vitreous), layer 1, layer 2, ..., the
    last layer, background (choroid and below); a layer may be absent (thinned to nothing) but never out of order,
    never twice, never with background inside the retina. Per column this is a path through the states
    ``background above, 1, ..., C-1, background below`` that never goes back; dynamic programming finds the path of
    the highest summed score, for all columns at once (Viterbi, as graph-search layer segmentation does).

    Args:
        scores: ``(C, H, W)`` log-probabilities (or any per-pixel additive scores) of class 0 (background) and the
            layers 1..C-1 in their top-to-bottom order.

    Returns:
        ``(H, W)`` int64 labels.
    """
    scores = np.asarray(scores, dtype=np.float32)
    n_classes, height, width = scores.shape
    state_class = np.array([0, *range(1, n_classes), 0])  # background above, the layers, background below
    emission = scores[state_class]  # (S, H, W)
    best = emission[:, 0].copy()  # a column may start in any state (a crop that cuts the vitreous)
    came_from = np.zeros((height, len(state_class), width), dtype=np.int8)
    states = np.arange(len(state_class))[:, None]
    for row in range(1, height):
        # the best earlier state at or above each state: a running maximum down the state order
        running = np.maximum.accumulate(best, axis=0)
        is_new = np.concatenate([np.ones((1, width), bool), running[1:] > running[:-1]], axis=0)
        origin = np.maximum.accumulate(np.where(is_new, states, 0), axis=0)
        came_from[row] = origin
        best = running + emission[:, row]
    path = np.empty((height, width), dtype=np.int64)
    path[-1] = best.argmax(axis=0)
    for row in range(height - 1, 0, -1):
        path[row - 1] = np.take_along_axis(came_from[row], path[row][None], axis=0)[0]
    return state_class[path]


def unordered_columns(label: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Which columns of an ``(H, W)`` layer label map have a layer below a later one: top to bottom, the layers run
    1, 2, ... (each may be absent). Background and unannotated pixels (``ignore_index``) are not judged: hand-drawn
    polygons leave gaps of background between neighbouring layers. Returns a boolean ``(W,)``."""
    label = np.asarray(label).astype(np.int64)  # signed: -1 marks the pixels not judged
    layer = (label > 0) & (label != ignore_index)
    state = np.where(layer, label, -1)
    reached = np.maximum.accumulate(state, axis=0)
    before = np.vstack([np.full((1, label.shape[1]), -1), reached[:-1]])
    return (layer & (state < before)).any(axis=0)


class RequireLayerOrderd(MapTransform):
    """Refuse a layer label map out of the anatomical order in more than ``max_unordered`` of its columns (those
    holding a layer): a label upside down, or with two layers' colours or values exchanged. Such a label trains the
    network on it and, in validation, skews the key metric and the choice of the best model, without a word;
    predictions are put in order (:class:`OrderLayersd`), labels were not checked. The annotations of the NR206
    sample break it in none of their columns; background between layers (the gaps hand-drawn polygons leave) is not
    judged.

    Raises:
        DataError: naming the label file, with the share of columns out of order.
    """

    def __init__(
        self,
        keys: KeysCollection,
        enabled: bool = True,
        max_unordered: float = 0.1,
        ignore_index: int = IGNORE_INDEX,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.enabled, self.max_unordered, self.ignore_index = enabled, max_unordered, ignore_index

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        if not self.enabled:
            return d
        for key in self.key_iterator(d):
            label = convert_to_numpy(d[key])
            label = label.reshape(label.shape[-2:]) if label.ndim == 3 and label.shape[0] == 1 else label
            if label.ndim != 2:
                continue
            columns = (label > 0) & (label != self.ignore_index)
            with_layers = columns.any(axis=0)
            if not with_layers.any():
                continue
            unordered = float(unordered_columns(label, self.ignore_index)[with_layers].mean())
            if unordered > self.max_unordered:
                source = source_of(d[key], key)
                raise DataError(
                    str(source),
                    f"its layers are out of their top-to-bottom order in {unordered:.0%} of its columns (at most "
                    f"{self.max_unordered:.0%} expected): an upside-down label, or two layers' colours or values "
                    "exchanged.",
                    "Check the label file (and label_colors / label_values); a task whose classes are no layers "
                    "runs with --layer_order False.",
                )
        return d


def retina_rows(label: np.ndarray, ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """Per column of an ``(H, W)`` (or ``(1, H, W)``) layer label map that holds a layer, the rows of its topmost
    and its lowest layer pixel: the retina's top and bottom. Two empty arrays where no column holds a layer."""
    label = np.asarray(label)
    label = label.reshape(label.shape[-2:])
    layer = (label > 0) & (label != ignore_index)
    columns = layer.any(axis=0)
    rows = np.arange(label.shape[0])[:, None]
    top = np.where(layer, rows, label.shape[0]).min(axis=0)[columns]
    return top, np.where(layer, rows, -1).max(axis=0)[columns]


def retina_height_fraction(label: np.ndarray, ignore_index: int = IGNORE_INDEX) -> float | None:
    """The share of a B-scan's rows its retina spans (from the first layer's top to the last layer's bottom, the
    median over the columns that hold a layer): what a whole-B-scan resize to ``image_size`` keeps, and what the
    network learns the layers' scale from. None where no column holds a layer."""
    top, bottom = retina_rows(label, ignore_index)
    return float(np.median(bottom - top + 1)) / np.asarray(label).shape[-2] if top.size else None


def retina_heights(
    datalist: Sequence[Mapping], load_transforms: Sequence, ignore_index: int = IGNORE_INDEX, max_cases: int = 200
) -> dict | None:
    """The retina heights of a training's labels (:func:`retina_height_fraction`), read by the bundle's own
    ``load_transforms``: ``{"min", "median", "max", "cases"}``, recorded in ``model.json`` (``training_labels``) so
    that inference can refuse a B-scan whose retina spans a share of its height the model never saw. At most
    ``max_cases`` labels, evenly spread over the list (a larger training reads a sample of that many: its range can
    only be narrower than the whole list's, by the spread of the B-scans left out). ``ignore_index``: the label
    value of unannotated pixels, not retina. None without labels."""
    labelled = [item for item in datalist if item.get("label") is not None]
    if not labelled:
        return None
    step = max(1, -(-len(labelled) // max_cases))
    load = Compose(list(load_transforms))
    fractions = []
    for item in labelled[::step]:
        fraction = retina_height_fraction(convert_to_numpy(load(dict(item))["label"]), ignore_index)
        if fraction is not None:
            fractions.append(fraction)
    if not fractions:
        return None
    values = np.asarray(fractions)
    return {
        "min": round(float(values.min()), 4),
        "median": round(float(np.median(values)), 4),
        "max": round(float(values.max()), 4),
        "cases": len(fractions),
    }


class RequireRetinaHeightd(MapTransform):
    """Refuse a prediction whose retina spans a share of the B-scan's height far from any the model learnt.

    Inference frames a B-scan whose retina is too thin first (:class:`FrameRetinad`); this judges the rows the
    network saw (``retina_frame`` in the metadata), and so what framing could not fix: a tight crop, a retina
    thickened by disease, a B-scan whose retina the framing could not bring to the learnt scale.

    The whole B-scan is resized to ``image_size``, so a scan with more rows around the retina (another scan depth,
    padding bands with a scale bar, dither or a faint gradient that the padding check cannot call uniform) shows the
    network a retina thinner than any it learnt, and a tight crop a thicker one. Its layers then come out in order,
    every one present, with thicknesses wrong by up to 8 times (OPL; NFL doubled), and no other check fires. The
    prediction's retina (:func:`retina_height_fraction`, after :class:`OrderLayersd`; inference judges the label
    map ``AsDiscreted`` gives) is compared with the range of
    the training labels' (``learnt``, from ``model.json``): beyond ``max_ratio`` times its bounds, the B-scan is
    refused with the rows to crop it to (or how far to pad it). A retina thickened by disease beyond the ratio is
    refused too, as one the model never saw. The phantom-trained model (retinas at 27-30 % of the rows), on one
    B-scan given more rows of its own background: its NFL 10 % thicker than the truth with the retina 1.24 times
    thinner than the thinnest learnt, 16 % at 1.34, 41 % (and the OPL 33 % thinner) at 1.45, the OPL 8 times too
    thin at 1.66 (the oct_layers README): hence 1.3.

    Args:
        keys: the prediction, ``(C, H, W)`` (one-hot or scores) or ``(1, H, W)`` labels.
        learnt: ``{"min", "median", "max"}`` shares of the height, the model's
            (:func:`clinseg.pipelines.engine.ensembles.training_label_range`); None checks nothing.
        max_ratio: how many times thinner than the thinnest, or thicker than the thickest, learnt retina a
            prediction's may be; None checks nothing.
        enabled: ``False`` (a task whose classes are no layers) checks nothing.

    Raises:
        DataError: naming the image, with its retina's share, the learnt range and the rows that would match it.
    """

    def __init__(
        self,
        keys: KeysCollection,
        learnt: Mapping | None = None,
        max_ratio: AtLeastOne | None = 1.3,
        enabled: bool = True,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.learnt, self.max_ratio, self.enabled = learnt, max_ratio, enabled

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        if not self.enabled or self.learnt is None or self.max_ratio is None:
            return d
        for key in self.key_iterator(d):
            values = convert_to_numpy(d[key])
            labels = values.argmax(0) if values.ndim == 3 and values.shape[0] > 1 else values.reshape(values.shape[-2:])
            fraction = retina_height_fraction(labels)
            if fraction is None:
                continue
            # the rows the network saw: a B-scan framed by FrameRetinad showed it only its window
            frame = getattr(d[key], "meta", {}).get("retina_frame") or {}
            height = int(frame.get("rows", labels.shape[0]))
            fraction *= labels.shape[0] / height
            low, high = self.learnt["min"] / self.max_ratio, self.learnt["max"] * self.max_ratio
            if low <= fraction <= high:
                continue
            learnt = f"the retina at {self.learnt['median']:.0%}"
            seen = f"the {height} rows segmented (of its {labels.shape[0]})" if frame else f"its {height} rows"
            if frame:
                learnt += f"; framed to rows {frame['first_row']}-{frame['first_row'] + frame['rows'] - 1} already"
            top, bottom = (float(np.median(rows)) for rows in retina_rows(labels))
            wanted = round((bottom - top + 1) / self.learnt["median"])
            first = round((top + bottom) / 2 - wanted / 2)
            if fraction < low and first >= 0 and first + wanted <= labels.shape[0]:
                fix = f"Crop its rows to about {first}-{first + wanted - 1} ({learnt})"
            elif fraction < low:
                fix = f"Crop it to about {wanted} rows around the retina ({learnt})"
            else:
                fix = f"Pad it with rows of the scan's background to about {wanted} in all ({learnt})"
            raise DataError(
                str(source_of(d[key], key)),
                f"its retina spans {fraction:.0%} of {seen}, where the model learnt retinas spanning "
                f"{self.learnt['min']:.0%}-{self.learnt['max']:.0%} of theirs (at most {self.max_ratio:g} times "
                f"{'thinner' if fraction < low else 'thicker'} accepted): the B-scan holds "
                f"{'more' if fraction < low else 'fewer'} rows around the retina than those it was trained on "
                "(another scan depth, padding bands, a tight crop), and its layers would be measured at a scale "
                "the network never saw: plausible, in order, and wrong.",
                f"{fix}, or train on B-scans like it; --max_retina_height_ratio sets the limit.",
            )
        return d


class FrameRetinad(MapTransform, InvertibleTransform):
    """Crop a B-scan's rows to the framing the model learnt: its retina spanning the share of the rows the training
    labels' retinas spanned.

    The whole B-scan is resized to the network's ``image_size``, so its retina reaches the network at the scale of
    its share of the rows. A deeper scan (another scanner's depth range), or one padded above and below, shows the
    network a retina thinner than any it learnt, and its layers come out in order with thicknesses wrong by up to 8
    times (:class:`RequireRetinaHeightd`). As nnU-Net resamples every case to the spacing it trained on, this
    transform brings such a B-scan to the learnt framing before the network sees it, so it is segmented rather than
    refused:

    1. uniform bands at the top and bottom (padding, :func:`~clinseg.datasets.oct.bscans.padding_rows`) are cut off;
    2. where ``learnt`` (the training labels' retina heights, ``{"min", "median", "max"}`` shares of the rows) is
       given, one pass of ``network`` over the B-scan resized to ``image_size`` finds its retina (the layers ordered
       by :func:`order_layers`); a retina thinner than the thinnest learnt (by over ``tolerance``) is framed by a
       window of rows that makes it span the learnt median, centred on it and holding its top and bottom in every
       column with half its height to spare. The pass is repeated on the window (at most ``passes`` passes in all),
       which is narrowed or widened again while the retina found there spans no learnt share: a first pass at a
       scale far from the learnt one finds the retina's place better than its height.

    Only rows far from the retina are cut: a window holds several times the retina's height (6 times at NR206's
    16 %). A retina thicker than the thickest learnt is left as it is (a tight crop cannot be told from a retina
    thickened by disease): :class:`RequireRetinaHeightd` judges it. Invertible: ``Invertd`` puts the prediction
    back on the B-scan's own rows, the rows cut off as background. The window is kept in the metadata
    (``retina_frame``: the first row, the rows kept, the B-scan's rows), for the results and for
    :class:`RequireRetinaHeightd`, which judges the retina against the rows the network saw.

    Args:
        keys: the B-scan, ``(1, H, W)``, as read (``intensity`` scales it, and it is resized, for the pass alone).
        network: the model (one network or an ensemble returning logits); None finds no retina (bands only).
        image_size: the network's input size, ``(rows, columns)``.
        learnt: the training labels' retina heights (:func:`retina_heights`); None frames nothing but the bands.
        intensity: the dictionary transforms the rows shown to the network go through first (the bundle's intensity
            scaling, which follows the framing: the window's own percentiles, not those of the bands around it).
        passes: the most passes of the network a B-scan is given to find its framing.
        tolerance: how much thinner (relative) than the thinnest learnt a retina may span and be left unframed: a
            B-scan near the learnt scale is segmented on its own rows, as the fundus bundle leaves a disc within
            10 % of the learnt size unresampled.
        min_rows: refuse a B-scan with fewer rows than this left once its bands are cut off.
        enabled: ``False`` leaves every B-scan as it is (and ``inverse`` changes nothing).

    Raises:
        DataError: naming the B-scan, when its bands leave fewer than ``min_rows`` rows.
    """

    def __init__(
        self,
        keys: KeysCollection,
        network: torch.nn.Module | None = None,
        image_size: Sequence[int] = (256, 384),
        learnt: Mapping | None = None,
        intensity: Sequence[Callable] | None = None,
        passes: int = 3,
        tolerance: float = 0.1,
        min_rows: int = MIN_BSCAN_SIZE,
        enabled: bool = True,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.network, self.image_size, self.learnt = network, tuple(int(n) for n in image_size), learnt
        self.intensity = Compose(list(intensity)) if intensity else None
        self.passes, self.tolerance, self.min_rows, self.enabled = passes, tolerance, min_rows, enabled

    def retina(self, image: torch.Tensor, key: Hashable = "image") -> tuple[np.ndarray, np.ndarray] | None:
        """The top and bottom rows of the retina of a ``(1, H, W)`` B-scan in each column that holds one, on its
        own rows, from one pass of the network at ``image_size`` (after ``intensity``, at ``key``); None when it
        finds none."""
        if self.intensity is not None:
            image = self.intensity({key: image})[key]
        values = torch.as_tensor(image).as_subclass(torch.Tensor)[None].float()
        parameter = next(iter(self.network.parameters()), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        if device.type == "cuda" and torch.utils.data.get_worker_info() is not None:
            raise ConfigError(
                "num_workers",
                "framing the B-scans (frame_retina) runs the network as each B-scan is read, and a CUDA network "
                "cannot run in a DataLoader worker process.",
                "Run with --num_workers 0 (the default), or --frame_retina False.",
            )
        resized = torch.nn.functional.interpolate(values, size=self.image_size, mode="bilinear")
        training = self.network.training
        self.network.eval()  # batch statistics of one B-scan would be no model's
        try:
            with torch.no_grad():
                logits = self.network(resized.to(device))[0].float().cpu()
        finally:
            self.network.train(training)
        top, bottom = retina_rows(order_layers(torch.log_softmax(logits, dim=0).numpy()))
        if not top.size:
            return None
        scale = values.shape[-2] / self.image_size[0]
        return top * scale, (bottom + 1) * scale - 1

    def window(
        self, top: np.ndarray, bottom: np.ndarray, shown: tuple[int, int], scan: tuple[int, int]
    ) -> tuple[int, int] | None:
        """The rows ``[first, last)`` of the B-scan that frame a retina of these tops and bottoms (rows of the
        B-scan) at the learnt median share, inside the ``scan`` rows (those between its bands). None when the rows
        ``shown`` to the network already frame it at a learnt share (within ``tolerance``), when the retina is
        thicker than learnt in all of the scan's rows (a tight crop or a thickened retina: for the check to judge),
        or when no other window would change it."""
        height = float(np.median(bottom - top + 1))
        share, (low, high) = height / (shown[1] - shown[0]), scan
        thinnest, thickest = self.learnt["min"] / (1 + self.tolerance), self.learnt["max"] * (1 + self.tolerance)
        if thinnest <= share <= thickest or (share > thickest and shown == scan):
            return None
        wanted = height / self.learnt["median"]
        centre = float(np.median((top + bottom + 1) / 2))
        first, last = centre - wanted / 2, centre + wanted / 2
        # every column's retina inside, with half its height to spare (a curved or tilted retina)
        first = min(first, float(np.percentile(top, 1)) - height / 2)
        last = max(last, float(np.percentile(bottom, 99)) + 1 + height / 2)
        if first < low:  # shift rather than shorten the window where the B-scan allows
            first, last = low, last + (low - first)
        if last > high:
            first, last = max(low, first - (last - high)), high
        window = int(np.floor(first)), int(np.ceil(last))
        return None if window == tuple(shown) else window

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key] if isinstance(d[key], MetaTensor) else MetaTensor(torch.as_tensor(d[key]))
            rows = image.shape[-2]
            first, last = 0, rows
            if self.enabled:
                first, last = self._frame(image, key)
            framed = MetaTensor(image.as_subclass(torch.Tensor)[..., first:last, :], meta=dict(image.meta))
            framed.applied_operations = list(image.applied_operations)
            affine = image.affine.clone()
            affine[:, -1] += affine[:, 0] * first  # the first row kept is the new origin
            framed.affine = affine
            if (first, last) != (0, rows):
                framed.meta["retina_frame"] = {"first_row": first, "rows": last - first, "of_rows": rows}
            extra = {"first": first, "last": last, "affine": image.affine.tolist()}
            self.push_transform(framed, orig_size=list(image.shape[1:]), extra_info=extra)
            d[key] = framed
        return d

    def _frame(self, image: MetaTensor, key: Hashable) -> tuple[int, int]:
        rows = image.shape[-2]
        grey = convert_to_numpy(image).reshape(-1, *image.shape[-2:]).mean(axis=0)
        above, below = padding_rows(grey)
        first, last = above, rows - below
        if last - first < self.min_rows:
            raise DataError(
                str(source_of(image, key)),
                f"holds {max(last - first, 0)} rows of scan between uniform bands ({above} rows at the top, {below} "
                f"at the bottom, of {rows}): fewer than the {self.min_rows} a B-scan needs; a blank or failed export?",
            )
        if self.network is None or self.learnt is None:
            return first, last
        scan = first, last
        # each pass sees the rows framed by the one before: a retina found too thin at a scale far from the learnt
        # one (the first pass) is measured again at the learnt scale, and the window widened or narrowed to it
        for _ in range(self.passes):
            found = self.retina(image[..., first:last, :], key)
            window = None if found is None else self.window(found[0] + first, found[1] + first, (first, last), scan)
            if window is None:
                break
            first, last = window
        return first, last

    def inverse(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            record = self.pop_transform(d[key])
            info, rows = record[TraceKeys.EXTRA_INFO], record[TraceKeys.ORIG_SIZE][0]
            first, last = info["first"], info["last"]
            framed = d[key]
            if (first, last) == (0, rows):
                continue
            values = framed.as_subclass(torch.Tensor) if isinstance(framed, MetaTensor) else torch.as_tensor(framed)
            # the rows cut off are background: a prediction's background channel wins there outright, an image is 0
            fill = torch.zeros((*values.shape[:-2], rows, values.shape[-1]), dtype=values.dtype, device=values.device)
            if values.shape[0] > 1:
                fill[0] = float(values.max()) + 50.0
            fill[..., first:last, :] = values
            restored = MetaTensor(fill, meta=dict(getattr(framed, "meta", {})))
            restored.applied_operations = list(getattr(framed, "applied_operations", []))
            restored.affine = torch.as_tensor(info["affine"], dtype=torch.float64)
            d[key] = restored
        return d


class OrderLayersd(MapTransform):
    """Replace each key's ``(C, H, W)`` prediction (logits or probabilities) by the one-hot map of
    :func:`order_layers`: the most likely labelling whose layers lie in anatomical order in every column. Pixels the
    network called background between two layers, or a layer above the one before it, are relabelled by what the
    column allows. ``enabled=False`` passes predictions through (the same config, ordering off).

    The ordering also hides what it repairs: on an upside-down B-scan, or one unlike any the network learnt, it turns
    a jumble of layers into a map with every layer present and in order, whose thicknesses look plausible and are
    wrong. The share of the retina (pixels that are a layer before or after) whose class the ordering changed is kept
    in the metadata (``layer_order_relabelled``; a trained network's ordered prediction changes well under 1 % of it);
    with ``max_relabelled`` a prediction that needed more is refused instead (inference: at most 0.2, say; not in
    validation during training, where an untrained network's predictions are out of order throughout).

    Raises:
        DataError: naming the image, when the ordering changed more than ``max_relabelled`` of the retina.
    """

    def __init__(
        self,
        keys: KeysCollection,
        logits: bool = True,
        enabled: bool = True,
        max_relabelled: float | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.logits, self.enabled, self.max_relabelled = logits, enabled, max_relabelled

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if not self.enabled:
            return d
        for key in self.key_iterator(d):
            prediction = d[key]
            values = torch.as_tensor(prediction).detach().float()
            if values.ndim != 3:
                raise ValueError(f"'{key}': expected a (classes, rows, columns) prediction, got {tuple(values.shape)}.")
            scores = torch.log_softmax(values, dim=0) if self.logits else torch.log(values.clamp_min(1e-7))
            labels = torch.as_tensor(order_layers(scores.cpu().numpy()))
            unordered = values.argmax(0).cpu()
            retina = (labels > 0) | (unordered > 0)
            relabelled = float((labels != unordered)[retina].float().mean()) if retina.any() else 0.0
            if self.max_relabelled is not None and relabelled > self.max_relabelled:
                source = source_of(prediction, key)
                raise DataError(
                    str(source),
                    f"the predicted layers are out of their top-to-bottom order in {relabelled:.0%} of the retina (at "
                    f"most {self.max_relabelled:.0%} expected): an upside-down B-scan, or an image unlike those the "
                    "model learnt; its ordered layer map and thicknesses would look plausible and be wrong.",
                )
            one_hot = torch.nn.functional.one_hot(labels, values.shape[0]).permute(2, 0, 1).to(values.dtype)
            if isinstance(prediction, MetaTensor):
                meta = {**prediction.meta, "layer_order_relabelled": relabelled}
                one_hot = MetaTensor(one_hot, meta=meta, applied_operations=prediction.applied_operations)
            d[key] = one_hot.to(prediction.device) if isinstance(prediction, torch.Tensor) else one_hot
        return d


class RandSpeckleNoised(RandomizableTransform, MapTransform):
    """Speckle-like augmentation for OCT: multiply the image by spatially correlated noise of mean 1.

    Speckle is the grain of coherent imaging: a multiplicative noise whose grains span a few pixels, stronger or
    weaker from one scanner and averaging setting to the next. Additive white noise (``RandGaussianNoised``) has
    neither property. Here the noise is a gamma variate of ``looks`` looks (fewer looks: stronger speckle), blurred by
    a Gaussian of ``grain_sigma`` pixels (the grain), renormalised to mean 1; the result is clipped to the image's own
    range, so the intensity scaling before it still holds. Both are drawn uniformly from their ranges per call.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.2,
        looks: tuple[float, float] = (2.0, 8.0),
        grain_sigma: tuple[float, float] = (0.5, 1.5),
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if not 0 < looks[0] <= looks[1]:
            raise ValueError(f"looks must be a range (low, high) of positive values, got {looks}.")
        if not 0 <= grain_sigma[0] <= grain_sigma[1]:
            raise ValueError(f"grain_sigma must be a range (low, high) of non-negative values, got {grain_sigma}.")
        self.looks = looks
        self.grain_sigma = grain_sigma

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        from scipy.ndimage import gaussian_filter

        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        looks = self.R.uniform(*self.looks)
        sigma = self.R.uniform(*self.grain_sigma)
        for key in self.key_iterator(d):
            image = d[key]
            noise = self.R.gamma(shape=looks, scale=1.0 / looks, size=np.shape(image)).astype(np.float32)
            if sigma > 0:
                # the grain spans pixels, not channels: blur the spatial axes only
                noise = gaussian_filter(noise, sigma=[0] + [sigma] * (noise.ndim - 1), mode="reflect")
            noise /= noise.mean()
            image_t = torch.as_tensor(image)
            low, high = image_t.min(), image_t.max()
            speckled = (image_t * torch.as_tensor(noise, device=image_t.device)).clamp(low, high)
            d[key] = speckled.to(image_t.dtype) if isinstance(image, torch.Tensor) else speckled.numpy()
        return d
