"""The decision rule of a binary segmentation, chosen on validation data and stored with the model.

A network gives a foreground probability per pixel; turning it into a mask takes a rule: a threshold (argmax of two
classes is a threshold of 0.5) and, optionally, the removal of small isolated components. As nnU-Net decides its
post-processing, the rule is chosen on the validation cases of the training, at the epoch of the best model, and kept
only where it helps:

- :class:`DecisionRuleSearch` (a validator handler) keeps each validation case's foreground probability and
  reference from the epoch of the best key metric;
- at the end of the training, :func:`choose_rule` scores every candidate rule by the mean per-case F1 (Dice) inside
  the reference's valid region (the FOV), and keeps a threshold other than 0.5, or a component filter, only when it
  beats the plain rule by at least ``min_gain``; the rule, with both scores, goes into the model's record
  (``model.json``, :mod:`clinseg.pipelines.runs`), so it is promoted, fetched and exported with the model;
- :class:`ApplyDecisionRuled` applies the rule stored beside a checkpoint in inference and evaluation (the plain rule
  when the record holds none: an older model, an ensemble, a training without validation).

Component sizes are fractions of the valid region's area (the field of view, else the image), so a rule chosen on
one camera's photographs means the same on a larger photograph of another.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type

logger = logging.getLogger(__name__)

RECORD_KEY = "decision_rule"  # the key of the rule in a model's record (model.json)
PLAIN_RULE = {"threshold": 0.5, "min_component_fraction": 0.0}
THRESHOLDS = tuple(round(float(t), 3) for t in np.arange(0.30, 0.701, 0.025))
# fractions of the valid region's area; on a DRIVE field of view (about 227,000 pixels) 2e-5 is 5 pixels, 4e-4 is 90
MIN_COMPONENT_FRACTIONS = (0.0, 2e-5, 5e-5, 1e-4, 2e-4, 4e-4)
MAX_CHECKPOINT_CASES_BYTES = 256 * 2**20
"""The most the best epoch's decision cases may add to the latest checkpoint (DRIVE's five validation photographs
take 3.7 MB)."""


def _f1(prediction: np.ndarray, reference: np.ndarray) -> float:
    both = np.count_nonzero(prediction & reference)
    total = np.count_nonzero(prediction) + np.count_nonzero(reference)
    return 1.0 if total == 0 else 2.0 * both / total


def remove_small_components(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """``mask`` without its connected components (full connectivity) of fewer than ``min_pixels`` pixels.

    Not MONAI's ``RemoveSmallObjects``: it passes ``min_size`` to scikit-image, whose 0.26 removes objects of that
    size too (``<=``, where earlier releases removed smaller ones only), so the rule would change with the version."""
    if min_pixels <= 0 or not mask.any():
        return mask
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def apply_rule(probability: np.ndarray, rule: Mapping, valid: np.ndarray | None = None) -> np.ndarray:
    """The mask ``rule`` makes of a foreground ``probability`` map; ``valid`` (the field of view) sets the area the
    component fraction is taken of, and nothing outside it is foreground."""
    mask = probability > float(rule["threshold"])  # 0.5 is argmax of the two classes (a tie goes to background)
    if valid is not None:
        mask &= valid
    area = float(np.count_nonzero(valid)) if valid is not None else float(mask.size)
    return remove_small_components(mask, float(rule.get("min_component_fraction", 0.0)) * area)


def choose_rule(
    cases: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    thresholds: Sequence[float] = THRESHOLDS,
    min_component_fractions: Sequence[float] = MIN_COMPONENT_FRACTIONS,
    min_gain: float = 0.002,
) -> dict:
    """The decision rule for ``cases`` (foreground probability, boolean reference, boolean valid region): the
    candidate of the best mean per-case F1, or the plain rule when no candidate beats it by ``min_gain`` (a
    difference that small, on a handful of validation cases, is not evidence). Returns the rule with its score,
    the plain rule's score and the number of cases, and the best candidate not kept (``best_candidate``)."""
    if not cases:
        raise ValueError("no validation cases to choose a decision rule on")

    def score(rule: Mapping) -> float:
        return float(np.mean([_f1(apply_rule(p, rule, v), r & v) for p, r, v in cases]))

    plain = score(PLAIN_RULE)
    best_rule, best = dict(PLAIN_RULE), plain
    for threshold in thresholds:
        for fraction in min_component_fractions:
            rule = {"threshold": float(threshold), "min_component_fraction": float(fraction)}
            value = score(rule)
            if value > best + 1e-12:
                best_rule, best = rule, value
    candidate = {**best_rule, "validation_f1": round(best, 6)}
    if best < plain + min_gain:
        best_rule, best = dict(PLAIN_RULE), plain
    chosen = {**best_rule, "validation_f1": round(best, 6), "plain_validation_f1": round(plain, 6), "cases": len(cases)}
    if best_rule == PLAIN_RULE and candidate["validation_f1"] > plain:
        chosen["best_candidate"] = candidate  # what was looked at and not kept: the gain was under min_gain
    return chosen


def rule_of_record(record: Mapping | None) -> dict:
    """The rule a model's record holds, or the plain rule."""
    rule = (record or {}).get(RECORD_KEY)
    if not rule:
        return dict(PLAIN_RULE)
    return {"threshold": float(rule["threshold"]), "min_component_fraction": float(rule["min_component_fraction"])}


def rule_for(checkpoint_path) -> dict:
    """The rule stored with the model at ``checkpoint_path`` (its ``model.json``); the plain rule for an ensemble of
    several checkpoints (each member's rule was chosen for that member alone) or a model without one."""
    from clinseg.pipelines import runs

    paths = checkpoint_path if isinstance(checkpoint_path, (list, tuple)) else [checkpoint_path]
    if len(paths) != 1:
        logger.info(f"an ensemble of {len(paths)} models: the plain decision rule (threshold 0.5) is used")
        return dict(PLAIN_RULE)
    rule = rule_of_record(runs.record_of(paths[0]))
    if rule != PLAIN_RULE:
        logger.info(f"decision rule chosen on validation: {rule}")
    return rule


class DecisionRuleSearch:
    """Validator handler of a binary task: keeps every validation case's foreground probability (``prob_key``,
    softmax, channel 1), reference and valid region (``label_key``, one-hot; ignored pixels are zero in every
    channel) from the epoch whose key metric was the best so far. :func:`rule_from` chooses the rule on them."""

    def __init__(self, prob_key: str = "prob", label_key: str = "label"):
        self.prob_key, self.label_key = prob_key, label_key
        self._epoch_cases: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def attach(self, engine: Engine) -> None:
        if not hasattr(engine.state, "decision_cases"):  # a resumed training restores them before it attaches
            engine.state.decision_cases, engine.state.decision_cases_epoch = [], None
        engine.add_event_handler(Events.EPOCH_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._keep_if_best)

    def _start(self, engine: Engine) -> None:
        self._epoch_cases = []

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        for item in output if isinstance(output, list) else [output]:
            prob, label = item[self.prob_key], item[self.label_key]
            if prob.shape[0] != 2 or label.shape[0] != 2:
                raise ValueError(f"DecisionRuleSearch is for binary tasks: got {prob.shape[0]} channels")
            label = torch.as_tensor(label).detach().cpu().numpy()
            self._epoch_cases.append(
                (
                    torch.as_tensor(prob[1]).detach().cpu().numpy().astype(np.float16),
                    label[1] > 0,
                    label.sum(0) > 0,
                )
            )

    def _keep_if_best(self, engine: Engine) -> None:
        # the best epoch is decided on the metrics gathered from every rank, so every rank takes this branch
        if getattr(engine.state, "best_metric_epoch", None) == engine.state.epoch:
            from clinseg.pipelines.context import from_every_rank

            engine.state.decision_cases = [case for share in from_every_rank(self._epoch_cases) for case in share]
            engine.state.decision_cases_epoch = engine.state.epoch


def cases_state(validator: Engine) -> dict | None:
    """The best epoch's validation cases a :class:`DecisionRuleSearch` kept, for the latest checkpoint, with their
    epoch: tensors (a checkpoint loads with weights only), the probabilities in 16 bits and the reference and valid
    region a bit per pixel. None when none are kept, or when they would take more than
    :data:`MAX_CHECKPOINT_CASES_BYTES` (a checkpoint is written every epoch); a resumed training then keeps the
    record's rule, and says so once."""
    cases = getattr(validator.state, "decision_cases", None)
    if not cases:
        return None
    size = sum(prob.size * 2 + 2 * ((prob.size + 7) // 8) for prob, _, _ in cases)
    if size > MAX_CHECKPOINT_CASES_BYTES:
        if not getattr(validator.state, "decision_cases_too_large", False):
            validator.state.decision_cases_too_large = True
            logger.warning(
                f"the best epoch's {len(cases)} validation cases take {size / 2**20:.0f} MiB, more than the "
                f"{MAX_CHECKPOINT_CASES_BYTES / 2**20:.0f} MiB kept in the latest checkpoint: a training resumed "
                "after its best epoch will not choose the decision rule (the model keeps the plain one)"
            )
        return None
    packed = []
    for prob, reference, valid in cases:
        shape = torch.tensor(prob.shape)
        bits = [torch.from_numpy(np.packbits(np.asarray(mask, dtype=bool).ravel())) for mask in (reference, valid)]
        packed.append((torch.from_numpy(np.ascontiguousarray(prob, dtype=np.float16)), *bits, shape))
    return {"epoch": int(validator.state.decision_cases_epoch), "cases": packed}


def restore_cases(validator: Engine, state: dict | None) -> None:
    """Keep the cases of :func:`cases_state` again (a resumed training), so that the rule is chosen on its best
    epoch's cases even when that epoch came before the interruption."""
    if not state:
        return
    cases = []
    for prob, reference, valid, shape in state["cases"]:
        shape = tuple(int(v) for v in shape)
        count = int(np.prod(shape))
        masks = [np.unpackbits(bits.numpy(), count=count).reshape(shape).astype(bool) for bits in (reference, valid)]
        cases.append((prob.numpy(), *masks))
    validator.state.decision_cases = cases
    validator.state.decision_cases_epoch = int(state["epoch"])


def rule_of_epoch(validator: Engine, epoch: int | None) -> dict | None:
    """:func:`rule_from` when the kept cases are of ``epoch`` (the epoch of the model to describe), else None."""
    if epoch is None or getattr(validator.state, "decision_cases_epoch", None) != epoch:
        return None
    return rule_from(validator)


def rule_from(validator: Engine) -> dict | None:
    """The rule chosen on the best epoch's validation cases that a :class:`DecisionRuleSearch` kept, or None when
    there are none (no search configured, no validation, or a resumed training whose best epoch was before it)."""
    cases = getattr(validator.state, "decision_cases", None)
    if not cases:
        return None
    rule = choose_rule([(p.astype(np.float32), r, v) for p, r, v in cases])
    kept = f"threshold {rule['threshold']}, components under {rule['min_component_fraction']:g} of the field removed"
    if rule["threshold"] == PLAIN_RULE["threshold"] and not rule["min_component_fraction"]:
        kept = "the plain one (threshold 0.5)"
        found = rule.get("best_candidate")
        if found:
            gain = found["validation_f1"] - rule["plain_validation_f1"]
            kept += (
                f"; the best other (threshold {found['threshold']}, components under "
                f"{found['min_component_fraction']:g} of the field removed) gains {gain:.4f}, too little to keep"
            )
    logger.info(
        f"decision rule on {rule['cases']} validation cases: {kept} (F1 {rule['plain_validation_f1']:.4f} with the "
        f"plain rule, {rule['validation_f1']:.4f} with this one)"
    )
    return rule


class ApplyDecisionRuled(MapTransform):
    """Turn a two-channel softmax ``keys`` into a label map (1 channel, 0/1; two one-hot channels with
    ``to_onehot``) by ``rule``; ``valid_key`` (the field of view, where present) bounds the area of the component
    fraction and the foreground. With the plain rule it gives what ``AsDiscreted(argmax=True)`` gives."""

    def __init__(
        self,
        keys: KeysCollection,
        rule: Mapping | None = None,
        valid_key: str | None = None,
        to_onehot: bool = False,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.rule = rule_of_record({RECORD_KEY: rule}) if rule else dict(PLAIN_RULE)
        self.valid_key, self.to_onehot = valid_key, to_onehot

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        valid = None
        if self.valid_key is not None and self.valid_key in d and self.rule["min_component_fraction"] > 0:
            valid = torch.as_tensor(d[self.valid_key]).detach().cpu().numpy()[0] > 0
        for key in self.key_iterator(d):
            prob = d[key]
            if prob.shape[0] != 2:
                raise ValueError(f"{key}: a decision rule needs the two channels of a binary softmax")
            foreground = torch.as_tensor(prob[1]).detach().cpu().float().numpy()
            mask = apply_rule(foreground, self.rule, valid)
            out = np.stack([~mask, mask]) if self.to_onehot else mask[None]
            d[key] = convert_to_dst_type(out.astype(np.float32), prob)[0]  # keeps a MetaTensor's meta
        return d
