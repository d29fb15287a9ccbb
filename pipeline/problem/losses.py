"""Losses under one contract: `loss(output, targets) -> (summed loss, count)` for one evaluation batch.

LCA integrates the *mean* loss over a whole split, but a split is evaluated in batches. A loss that
returns a per-batch mean cannot be turned into the split's mean when batches differ in what they average
over (the last, shorter batch; padded or ignored tokens). Returning the sum and the count it averages
over makes the split's mean exact for any evaluation batch size: sum of sums / sum of counts.

The built-in kinds take a model's raw output: a tensor, a tuple whose first element is the prediction,
or an object with `.logits` (what Hugging Face models return). A user's loss is given by reference,
`factory = "pkg.mod:fn"` with JSON `kwargs`; `fn(**kwargs)` returns the callable (the entry-point
convention: the reference names a factory, so a loss with settings is still plain JSON).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # what Hugging Face (and torch's cross_entropy) use for labels that do not count

LossFn = Callable[[Any, torch.Tensor], tuple[torch.Tensor, Any]]


def prediction(output: Any) -> torch.Tensor:
    """The prediction tensor inside a model's output (a tensor, `.logits`, or the first of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the prediction in a model output of type {type(output).__name__}; "
                    f"return a tensor, or an object with .logits")


def cross_entropy(output: Any, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classification: logits [N, C] (or [N, C, ...]) against class indices; labels -100 do not count."""
    logits = prediction(output)
    total = F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE_INDEX)
    return total, (targets != IGNORE_INDEX).sum()


def mse(output: Any, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Regression: squared error summed over every element; the mean is over elements, as F.mse_loss's."""
    pred = prediction(output)
    if pred.shape != targets.shape and pred.numel() == targets.numel():
        pred = pred.reshape(targets.shape)  # [N, 1] predictions against [N] targets
    return F.mse_loss(pred, targets.to(pred.dtype), reduction="sum"), targets.numel()


def token_cross_entropy(output: Any, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal language modelling, as Hugging Face computes it: position t predicts token t+1 (logits
    [N, T, V] shifted against labels [N, T]), labels -100 (padding, prompts) are ignored, and the mean is
    over the tokens that count in the whole split, not a mean of per-sequence or per-batch means."""
    logits = prediction(output)
    shifted = logits[..., :-1, :].reshape(-1, logits.shape[-1])
    labels = targets[..., 1:].reshape(-1)
    total = F.cross_entropy(shifted, labels, reduction="sum", ignore_index=IGNORE_INDEX)
    return total, (labels != IGNORE_INDEX).sum()


KINDS: dict[str, LossFn] = {
    "cross-entropy": cross_entropy,
    "mse": mse,
    "token-cross-entropy": token_cross_entropy,
}
