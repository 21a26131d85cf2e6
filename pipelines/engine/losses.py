"""Losses that honour unannotated pixels."""

from __future__ import annotations

import torch
from monai.losses import DiceLoss
from torch.nn.modules.loss import _Loss

from clinseg.transforms.oct import IGNORE_INDEX


class DiceCELossWithIgnore(_Loss):
    """``lambda_dice * Dice + lambda_ce * cross-entropy`` on logits and a ``(B, 1, ...)`` label map.

    Pixels labelled ``ignore_index`` (unannotated columns of a Duke B-scan, say) contribute to neither term: MONAI's
    ``DiceLoss`` masks them through its own ``ignore_index`` and cross-entropy skips them. MONAI's ``DiceCELoss``
    has no ``ignore_index``, hence this small combination of the two library losses.
    """

    def __init__(
        self,
        lambda_dice: float = 0.7,
        lambda_ce: float = 0.3,
        include_background: bool = True,
        ignore_index: int = IGNORE_INDEX,
        class_weights: list[float] | None = None,
        batch_dice: bool = False,
    ):
        super().__init__()
        if lambda_dice < 0 or lambda_ce < 0 or lambda_dice + lambda_ce == 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0, got dice={lambda_dice}, ce={lambda_ce}.")
        self.lambda_dice, self.lambda_ce, self.ignore_index = lambda_dice, lambda_ce, ignore_index
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
        return loss
