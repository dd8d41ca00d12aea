"""The DeRTa objective: MLE and RTO terms from ONE forward pass.

Both terms are token-level cross-entropies on the same shifted logits; RTO positions are the ones flagged in
`rto_mask`, whose label is the refusal token. How they combine is `train.loss_weighting`:

- `term_mean` (default): `mle_weight * mean_CE(MLE positions) + rto_weight * mean_CE(RTO positions)`. The weights
  mean what they say: `rto_weight = 0` is exactly recaug's loss (the token mean over MLE positions), and the many
  RTO positions of a row do not outweigh the MLE rows.
- `token_mean` (the reference implementation): `(mle_weight * sum_MLE + rto_weight * sum_RTO) / (n_MLE + n_RTO)`,
  one token mean over every supervised position; an RTO row (one target per harmful token) weighs ~10x a
  refusal row, and `rto_weight = 0` only rescales the MLE term.

`train.rto_keep_fraction` < 1 keeps a random share of the RTO positions each step (the reference's 8B full
fine-tune keeps ~5%; its 70B LoRA run keeps all).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from derta.transforms import IGNORE_INDEX


@dataclass
class LossTerms:
    total: torch.Tensor
    mle: torch.Tensor   # mean CE over MLE positions (0 when there are none)
    rto: torch.Tensor   # mean CE over RTO positions (0 when there are none)
    n_mle: int
    n_rto: int


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position CE of predicting labels[t+1] from logits[t]; 0 where there is no label. Shape [B, T-1]."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="none")
    return ce.view_as(shift_labels)


def combine_terms(sum_mle: torch.Tensor, sum_rto: torch.Tensor, n_mle: int, n_rto: int, mle_weight: float,
                  rto_weight: float, weighting: str) -> torch.Tensor:
    """The total loss from the per-term CE sums (see the module docstring for the two weightings)."""
    if weighting == "token_mean":
        return (mle_weight * sum_mle + rto_weight * sum_rto) / max(n_mle + n_rto, 1)
    if weighting == "term_mean":
        return mle_weight * sum_mle / max(n_mle, 1) + rto_weight * sum_rto / max(n_rto, 1)
    raise ValueError(f"train.loss_weighting={weighting!r}: expected 'term_mean' or 'token_mean'")


def derta_loss(logits: torch.Tensor, labels: torch.Tensor, rto_mask: torch.Tensor,
               mle_weight: float = 1.0, rto_weight: float = 1.0, weighting: str = "term_mean",
               rto_keep_fraction: float = 1.0, generator: torch.Generator | None = None) -> LossTerms:
    ce = token_losses(logits, labels)
    supervised = labels[:, 1:] != IGNORE_INDEX
    rto = supervised & rto_mask[:, 1:].bool()
    mle = supervised & ~rto
    if rto_keep_fraction < 1.0:  # the dropped RTO positions get no loss at all this step
        keep = torch.rand(rto.shape, generator=generator, device="cpu").to(rto.device) < rto_keep_fraction
        rto = rto & keep
    n_mle, n_rto = int(mle.sum()), int(rto.sum())
    sum_mle, sum_rto = ce[mle].sum(), ce[rto].sum()
    total = combine_terms(sum_mle, sum_rto, n_mle, n_rto, mle_weight, rto_weight, weighting)
    return LossTerms(total=total, mle=sum_mle.detach() / max(n_mle, 1), rto=sum_rto.detach() / max(n_rto, 1),
                     n_mle=n_mle, n_rto=n_rto)
