"""Refusal-position probe: how likely is the model to switch to a refusal at each response position?

For a prompt of P tokens and a response of N tokens, position i in 0..N is the state after
prompt + response[:i]; its next-token distribution is logits[P - 1 + i] of ONE forward pass over the full
sequence. P(refusal) sums the probability of the refusal-start tokens (`transforms.refusal_token_ids`) -- the
same tokens and the same positions the RTO loss trains.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def refusal_log_probs(logits: torch.Tensor, refusal_ids: list[int]) -> torch.Tensor:
    """log P(next token in refusal_ids) for every position of `logits` [..., V] -> [...].

    logsumexp over the refusal ids minus the log-normaliser: no [..., V] log-softmax is materialised."""
    refusal = torch.logsumexp(logits[..., refusal_ids].float(), dim=-1)
    return refusal - torch.logsumexp(logits.float(), dim=-1)


def response_positions(prompt_len: int, response_len: int) -> slice:
    """Logit rows that predict the token after prompt + response[:i], for i = 0..response_len."""
    if prompt_len < 1:
        raise ValueError("the prompt must have at least one token")
    return slice(prompt_len - 1, prompt_len + response_len)


@dataclass
class ProbeResult:
    refusal_prob: list[float]      # length N + 1
    top_token_ids: list[int]       # the model's top-1 next token at each position
    first_crossing: int | None     # first i with refusal_prob >= threshold
    min_prob: float
    mean_prob: float


def probe_logits(logits: torch.Tensor, prompt_len: int, response_len: int, refusal_ids: list[int],
                 threshold: float = 0.5) -> ProbeResult:
    """Probe one sequence from the logits [T, V] of a single forward pass over prompt + response."""
    return summarise(logits[response_positions(prompt_len, response_len)], refusal_ids, threshold)


def summarise(rows: torch.Tensor, refusal_ids: list[int], threshold: float) -> ProbeResult:
    """The probe over the logit rows [N + 1, V] that predict each response position."""
    probs = refusal_log_probs(rows, refusal_ids).exp().tolist()
    crossing = next((i for i, p in enumerate(probs) if p >= threshold), None)
    return ProbeResult(probs, rows.argmax(-1).tolist(), crossing, min(probs), sum(probs) / len(probs))


@torch.no_grad()
def probe(model, prompt_ids: list[int], response_ids: list[int], refusal_ids: list[int],
          threshold: float = 0.5) -> ProbeResult:
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids + response_ids], device=device)
    logits = model(input_ids=input_ids).logits[0]
    return probe_logits(logits, len(prompt_ids), len(response_ids), refusal_ids, threshold)


@torch.no_grad()
def probe_batch(model, sequences: list[tuple[list[int], list[int]]], refusal_ids: list[int],
                thresholds: list[float] | float = 0.5) -> list[ProbeResult]:
    """Probe many (prompt_ids, response_ids) pairs in ONE right-padded forward pass.

    Right padding keeps every row's positions 0..T-1 (causal attention never looks at the padding after a row), so
    each row's logits equal its unpadded forward. `logits_to_keep` computes the LM head only over the columns that
    hold some row's response span, not over the prompts.
    """
    device = next(model.parameters()).device
    lengths = [len(p) + len(r) for p, r in sequences]
    width = max(lengths)
    pad = 0
    input_ids = torch.tensor([p + r + [pad] * (width - n) for (p, r), n in zip(sequences, lengths)], device=device)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths], device=device)
    first = min(len(p) for p, _ in sequences) - 1  # the first logit column any row's probe reads
    if first < 0:
        raise ValueError("the prompt must have at least one token")
    keep = torch.arange(first, width, device=device)
    try:
        logits = model(input_ids=input_ids, attention_mask=mask, logits_to_keep=keep).logits
    except TypeError:  # a model without logits_to_keep: every column
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, first:]
    if isinstance(thresholds, (int, float)):
        thresholds = [float(thresholds)] * len(sequences)
    results = []
    for row, ((prompt_ids, response_ids), threshold) in enumerate(zip(sequences, thresholds)):
        # the columns of `logits` start at `first`
        span = response_positions(len(prompt_ids), len(response_ids))
        rows = logits[row, span.start - first:span.stop - first]
        results.append(summarise(rows, refusal_ids, threshold))
    return results


@torch.no_grad()
def mean_refusal_curve(model, sequences: list[tuple[list[int], list[int]]], refusal_ids: list[int],
                       max_positions: int | None = None) -> list[float]:
    """Mean P(refusal) at each response position over many (prompt_ids, response_ids) pairs."""
    sums: list[float] = []
    counts: list[int] = []
    for prompt_ids, response_ids in sequences:
        result = probe(model, prompt_ids, response_ids[:max_positions] if max_positions else response_ids,
                       refusal_ids)
        for i, p in enumerate(result.refusal_prob):
            if i == len(sums):
                sums.append(0.0)
                counts.append(0)
            sums[i] += p
            counts[i] += 1
    return [s / c for s, c in zip(sums, counts)]
