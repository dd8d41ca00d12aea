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

Memory: only supervised positions are projected to the vocabulary (see `supervised_token_losses`); the training
loop passes final hidden states + lm_head, so no [B, T, V] tensor exists (`hidden_only_kwargs`).
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


# rows of fp32 log-probabilities alive at once: 1024 x 128K vocab = 0.5 GB
CE_CHUNK_ROWS = 1024


def _ce(rows: torch.Tensor, targets: torch.Tensor, lm_head=None) -> torch.Tensor:
    logits = rows if lm_head is None else lm_head(rows)
    return F.cross_entropy(logits.float(), targets, reduction="none")


def supervised_token_losses(outputs: torch.Tensor, labels: torch.Tensor, chunk_rows: int | None = None,
                            lm_head=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE of each supervised position, [N]; the supervised mask over shifted positions, [B, T-1]).

    CE of predicting labels[t+1] from position t, computed only where there is a label. `outputs` are logits
    [B, T, V], or with `lm_head` the final hidden states [B, T, H] (the model then never builds [B, T, V] logits
    at all). The supervised rows are gathered first, then projected / upcast to fp32 in chunks of `chunk_rows`,
    each recomputed in the backward instead of keeping its fp32 log-softmax: peak loss memory is [chunk_rows, V]
    fp32, never an fp32 [B, T, V] copy."""
    chunk_rows = chunk_rows or CE_CHUNK_ROWS
    supervised = labels[:, 1:] != IGNORE_INDEX
    rows = outputs[:, :-1][supervised]
    targets = labels[:, 1:][supervised]
    if rows.size(0) <= chunk_rows or not torch.is_grad_enabled():
        return _ce(rows, targets, lm_head), supervised
    from torch.utils.checkpoint import checkpoint

    parts = [checkpoint(_ce, rows[start:start + chunk_rows], targets[start:start + chunk_rows], lm_head,
                        use_reentrant=False)
             for start in range(0, rows.size(0), chunk_rows)]
    return torch.cat(parts), supervised


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
               rto_keep_fraction: float = 1.0, generator: torch.Generator | None = None,
               lm_head=None) -> LossTerms:
    """`logits` [B, T, V]; or, with `lm_head` (the model's output projection), final hidden states [B, T, H]."""
    ce, supervised = supervised_token_losses(logits, labels, lm_head=lm_head)
    is_rto = rto_mask[:, 1:][supervised].bool()  # per supervised position, in the order of `ce`
    mle, rto = ~is_rto, is_rto
    if rto_keep_fraction < 1.0:  # the dropped RTO positions get no loss at all this step
        keep = torch.rand(supervised.shape, generator=generator, device="cpu").to(supervised.device) < rto_keep_fraction
        rto = rto & keep[supervised]
    n_mle, n_rto = int(mle.sum()), int(rto.sum())
    sum_mle, sum_rto = ce[mle].sum(), ce[rto].sum()
    total = combine_terms(sum_mle, sum_rto, n_mle, n_rto, mle_weight, rto_weight, weighting)
    return LossTerms(total=total, mle=sum_mle.detach() / max(n_mle, 1), rto=sum_rto.detach() / max(n_rto, 1),
                     n_mle=n_mle, n_rto=n_rto)


# `model(**batch, **hidden_only_kwargs(device))`: HF causal LMs then return no logits (logits_to_keep selects no position) and the
# final, normed hidden states as `hidden_states[-1]`, for `derta_loss(..., lm_head=model.get_output_embeddings())`
def hidden_only_kwargs(device) -> dict:
    return {"logits_to_keep": torch.empty(0, dtype=torch.long, device=device), "output_hidden_states": True}
