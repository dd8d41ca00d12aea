"""The DeRTa objective: MLE and RTO terms from ONE forward pass.

Both terms are token-level cross-entropies on the same shifted logits; RTO positions are the ones flagged in
`rto_mask`, whose label is the refusal token. With unit weights the total is one token-mean cross-entropy over
every supervised position of the batch, which is the reference implementation's semantics.
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


def derta_loss(logits: torch.Tensor, labels: torch.Tensor, rto_mask: torch.Tensor,
               mle_weight: float = 1.0, rto_weight: float = 1.0) -> LossTerms:
    ce = token_losses(logits, labels)
    supervised = labels[:, 1:] != IGNORE_INDEX
    rto = supervised & rto_mask[:, 1:].bool()
    mle = supervised & ~rto
    n_mle, n_rto = int(mle.sum()), int(rto.sum())
    sum_mle, sum_rto = ce[mle].sum(), ce[rto].sum()
    total = (mle_weight * sum_mle + rto_weight * sum_rto) / max(n_mle + n_rto, 1)
    return LossTerms(total=total, mle=sum_mle.detach() / max(n_mle, 1), rto=sum_rto.detach() / max(n_rto, 1),
                     n_mle=n_mle, n_rto=n_rto)
