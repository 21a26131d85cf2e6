"""Losses that honour unannotated pixels."""

from __future__ import annotations

import torch
from monai.losses import DiceLoss, SoftclDiceLoss
from torch.nn.modules.loss import _Loss

from clinseg.transforms.oct import IGNORE_INDEX


class DiceCELossWithIgnore(_Loss):
    """``lambda_dice * Dice + lambda_ce * cross-entropy + lambda_cldice * clDice + lambda_column_w1 * column term``
    on logits and a ``(B, 1, ...)`` label map.

    Pixels labelled ``ignore_index`` (unannotated columns of a Duke B-scan, say) contribute to none of the terms:
    MONAI's ``DiceLoss`` masks them through its own ``ignore_index`` and cross-entropy skips them. MONAI's
    ``DiceCELoss`` has no ``ignore_index``, hence this small combination of the two library losses.

    The clDice term (off by default; MONAI's ``SoftclDiceLoss``, Shit et al. 2021) scores the overlap of soft
    centrelines, so a thin vessel counts as much as a thick one and a break costs its whole length. It is taken over
    the foreground classes with the ignored pixels set to 0 in both the probabilities and the labels, so an
    unannotated pixel contributes to no centreline. ``cldice_iterations`` is how many soft erosions make the
    skeleton: at least half the width, in pixels, of the widest structure.

    The column term (:func:`column_mass_gap`, 2D only, off by default) is for label maps whose columns cross ordered
    layers, as an OCT B-scan's A-scans do.
    """

    def __init__(
        self,
        lambda_dice: float = 0.7,
        lambda_ce: float = 0.3,
        include_background: bool = True,
        ignore_index: int = IGNORE_INDEX,
        class_weights: list[float] | None = None,
        batch_dice: bool = False,
        lambda_column_w1: float = 0.0,
        lambda_cldice: float = 0.0,
        cldice_iterations: int = 5,
    ):
        super().__init__()
        weights = {"dice": lambda_dice, "ce": lambda_ce, "column_w1": lambda_column_w1, "cldice": lambda_cldice}
        if min(weights.values()) < 0 or sum(weights.values()) == 0:
            raise ValueError(f"loss weights must be >= 0 and not all 0, got {weights}.")
        self.lambda_dice, self.lambda_ce, self.ignore_index = lambda_dice, lambda_ce, ignore_index
        self.lambda_column_w1, self.lambda_cldice = lambda_column_w1, lambda_cldice
        self.cldice = SoftclDiceLoss(iter_=cldice_iterations, include_background=False, to_onehot_y=True)
        self.dice = DiceLoss(
            include_background=include_background,
            to_onehot_y=True,
            softmax=True,
            ignore_index=ignore_index,
            batch=batch_dice,
        )
        weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.cross_entropy = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.as_subclass(torch.Tensor) if hasattr(target, "as_subclass") else target
        logits = logits.as_subclass(torch.Tensor)
        if target.shape[1] != 1:
            raise ValueError(f"expected a (B, 1, ...) label map, got {tuple(target.shape)}.")
        loss = logits.new_zeros(())
        if self.lambda_dice:
            loss = loss + self.lambda_dice * self.dice(logits, target)
        if self.lambda_ce:
            if self.cross_entropy.weight is not None:
                self.cross_entropy.weight = self.cross_entropy.weight.to(logits.device)
            loss = loss + self.lambda_ce * self.cross_entropy(logits, target[:, 0].long())
        if self.lambda_cldice:
            loss = loss + self.lambda_cldice * self._cldice(logits, target.long())
        if self.lambda_column_w1:
            loss = loss + self.lambda_column_w1 * column_mass_gap(logits, target[:, 0].long(), self.ignore_index)
        return loss

    def _cldice(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``labels``: ``(B, 1, ...)``. An unannotated pixel becomes background, so it lies on no labelled centreline,
        and its probabilities are zeroed, so it lies on no predicted one."""
        annotated = labels != self.ignore_index
        probabilities = torch.softmax(logits.float(), dim=1) * annotated
        return self.cldice(probabilities, labels.masked_fill(~annotated, 0))


def column_mass_gap(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """How far the predicted layers sit from the labelled ones down each column, in rows.

    For each class and column, the softmax mass of the class above each row is compared with the label's (two
    cumulative sums down the column, the 1-D Wasserstein construction); the absolute gap is averaged over the rows,
    then over the classes and the columns. A layer displaced by k rows costs k times its thickness; a layer k rows
    too thick or too thin costs k on every row below it. Dice and cross-entropy count only the pixels that flip,
    whatever the shape of the error; this term sees where the layer's mass is, so a thin layer's thickness error
    weighs on every row beneath it. Columns holding an unannotated pixel (``ignore_index``) are left out.

    ``logits``: ``(B, C, rows, columns)``; ``labels``: ``(B, rows, columns)`` class indices.
    """
    if logits.ndim != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"the column term needs (B, C, rows, columns) logits and (B, rows, columns) labels, got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    ignored = labels == ignore_index
    annotated = ~ignored.any(dim=1, keepdim=True)  # (B, 1, columns)
    probabilities = torch.softmax(logits.float(), dim=1)
    one_hot = torch.nn.functional.one_hot(labels.masked_fill(ignored, 0), probabilities.shape[1])
    one_hot = one_hot.permute(0, 3, 1, 2).float()
    gap = (probabilities.cumsum(dim=2) - one_hot.cumsum(dim=2)).abs().mean(dim=2)  # (B, C, columns), in rows
    weight = annotated.float().expand_as(gap)
    return (gap * weight).sum() / weight.sum().clamp_min(1)
