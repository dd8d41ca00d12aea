"""The DeRTa loss on a hand-built batch equals an independent, loop-based computation."""
import math

import torch

from derta.losses import derta_loss
from derta.probe import probe_logits, refusal_log_probs, response_positions
from derta.transforms import IGNORE_INDEX

X = IGNORE_INDEX


def _batch():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5)
    # row 0: helpful-style MLE on the last 3 positions; row 1: RTO on positions 2..4 (target = token 4)
    labels = torch.tensor([[X, X, X, 1, 2, 3], [X, X, 4, 4, 4, X]])
    rto = torch.tensor([[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    return logits, labels, rto


def _manual(logits, labels, rto):
    mle_terms, rto_terms = [], []
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] == X:
                continue
            logp = logits[b, t - 1].log_softmax(-1)[labels[b, t]].item()
            (rto_terms if rto[b, t] else mle_terms).append(-logp)
    return mle_terms, rto_terms


def test_terms_match_manual_computation():
    logits, labels, rto = _batch()
    terms = derta_loss(logits, labels, rto)
    mle_terms, rto_terms = _manual(logits, labels, rto)
    assert terms.n_mle == 3 and terms.n_rto == 3
    assert math.isclose(terms.mle.item(), sum(mle_terms) / 3, rel_tol=1e-5)
    assert math.isclose(terms.rto.item(), sum(rto_terms) / 3, rel_tol=1e-5)
    # default term_mean: the mean CE of each term, added
    assert math.isclose(terms.total.item(), sum(mle_terms) / 3 + sum(rto_terms) / 3, rel_tol=1e-5)
    # token_mean (the reference): one token-mean CE over every supervised position
    reference = derta_loss(logits, labels, rto, weighting="token_mean")
    assert math.isclose(reference.total.item(), (sum(mle_terms) + sum(rto_terms)) / 6, rel_tol=1e-5)


def test_weights_scale_each_term():
    logits, labels, rto = _batch()
    mle_terms, rto_terms = _manual(logits, labels, rto)
    terms = derta_loss(logits, labels, rto, mle_weight=0.5, rto_weight=2.0)
    assert math.isclose(terms.total.item(), 0.5 * sum(mle_terms) / 3 + 2 * sum(rto_terms) / 3, rel_tol=1e-5)
    terms = derta_loss(logits, labels, rto, mle_weight=0.5, rto_weight=2.0, weighting="token_mean")
    assert math.isclose(terms.total.item(), (0.5 * sum(mle_terms) + 2 * sum(rto_terms)) / 6, rel_tol=1e-5)


def _tiny_lm():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Embedding(7, 8), torch.nn.Linear(8, 7))


def _grads(model, input_ids, labels, rto, **kwargs):
    model.zero_grad()
    derta_loss(model(input_ids), labels, rto, **kwargs).total.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_rto_weight_zero_gives_recaug_gradients():
    """A derta batch (MLE rows + RTO rows) with rto_weight=0 trains exactly like the recaug batch (its MLE rows)."""
    model = _tiny_lm()
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 6], [2, 3, 1, 1, 5, 0], [6, 5, 4, 3, 2, 1]])
    labels = torch.tensor([[X, X, X, 4, 5, 6], [X, X, 4, 4, 4, 4], [X, 5, 4, 3, X, X]])
    rto = torch.tensor([[0] * 6, [0, 0, 1, 1, 1, 1], [0] * 6], dtype=torch.bool)
    recaug = [0, 2]
    derta = _grads(model, input_ids, labels, rto, rto_weight=0.0)
    baseline = _grads(model, input_ids[recaug], labels[recaug], rto[recaug])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(derta, baseline))
    with_rto = _grads(model, input_ids, labels, rto)
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(with_rto, baseline))
    # the reference weighting is not recaug at rto_weight=0: the RTO positions still count in the denominator
    token_mean = _grads(model, input_ids, labels, rto, rto_weight=0.0, weighting="token_mean")
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(token_mean, baseline))


def test_weightings_are_identical_without_rto_positions():
    """vanilla / recaug batches have no RTO positions: both weightings give the same loss and gradients, which is
    why `derta experiment` reuses their trainings (and the base) across a loss_weighting change (training_key)."""
    model = _tiny_lm()
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]])
    labels = torch.tensor([[X, X, X, 4, 5, 6], [X, 5, 4, 3, X, X]])
    rto = torch.zeros(2, 6, dtype=torch.bool)
    for mle_weight in (1.0, 0.5):
        term = _grads(model, input_ids, labels, rto, mle_weight=mle_weight, rto_weight=2.0, weighting="term_mean")
        token = _grads(model, input_ids, labels, rto, mle_weight=mle_weight, rto_weight=2.0, weighting="token_mean")
        assert all(torch.equal(a, b) for a, b in zip(term, token))
    assert derta_loss(model(input_ids), labels, rto, weighting="term_mean").total.item() == \
        derta_loss(model(input_ids), labels, rto, weighting="token_mean").total.item()


def test_rto_keep_fraction_trains_a_random_share_of_rto_positions():
    torch.manual_seed(0)
    logits = torch.randn(4, 200, 5, requires_grad=True)
    labels = torch.full((4, 200), 4)
    rto = torch.ones(4, 200, dtype=torch.bool)
    full = derta_loss(logits, labels, rto)
    kept = derta_loss(logits, labels, rto, rto_keep_fraction=0.25, generator=torch.Generator().manual_seed(0))
    assert full.n_rto == 4 * 199 and 0.15 * full.n_rto < kept.n_rto < 0.35 * full.n_rto
    kept.total.backward()
    rows_with_grad = int((logits.grad.abs().sum(-1) > 0).sum())
    assert rows_with_grad == kept.n_rto  # dropped positions get no gradient


def test_one_backward_reaches_both_terms():
    logits, labels, rto = _batch()
    logits.requires_grad_(True)
    derta_loss(logits, labels, rto).total.backward()
    assert logits.grad[0, 2:5].abs().sum() > 0 and logits.grad[1, 1:4].abs().sum() > 0
    assert logits.grad[0, :2].abs().sum() == 0 and logits.grad[1, 4:].abs().sum() == 0


def test_rto_term_is_the_probe_refusal_probability():
    """The RTO loss at a position is -log P(refusal) as the probe computes it: shared math, same positions."""
    logits, labels, rto = _batch()
    terms = derta_loss(logits, labels, rto)
    prompt_len, response_len = 2, 3  # row 1: response tokens at 2..4, predicted from logits 1..3
    rows = logits[1][response_positions(prompt_len, response_len)][:response_len]
    assert math.isclose(-refusal_log_probs(rows, [4]).mean().item(), terms.rto.item(), rel_tol=1e-5)


def test_probe_logits_summary():
    logits = torch.zeros(5, 4)
    logits[2:4, 0] = 10.0  # refusal token 0 likely at response positions 1 and 2 (logit rows 2, 3)
    result = probe_logits(logits, prompt_len=2, response_len=3, refusal_ids=[0], threshold=0.5)
    assert len(result.refusal_prob) == 4
    assert result.first_crossing == 1
    assert result.top_token_ids[1] == 0
    assert math.isclose(result.mean_prob, sum(result.refusal_prob) / 4)


def test_chunked_supervised_ce_matches_one_shot_values_and_gradients():
    """The chunked, recomputed CE (long batches) gives the same terms and logits gradient as one chunk."""
    from derta import losses

    torch.manual_seed(1)
    logits = torch.randn(3, 40, 11)
    labels = torch.randint(0, 11, (3, 40))
    labels[:, :7] = X  # prompts
    labels[1, 30:] = X  # padding
    rto = torch.zeros(3, 40, dtype=torch.bool)
    rto[2, 10:25] = True
    results = []
    for chunk in (10_000, 16):
        leaf = logits.clone().requires_grad_(True)
        original = losses.CE_CHUNK_ROWS
        losses.CE_CHUNK_ROWS = chunk
        try:
            ce, _ = losses.supervised_token_losses(leaf, labels, chunk_rows=chunk)
            terms = derta_loss(leaf, labels, rto)
        finally:
            losses.CE_CHUNK_ROWS = original
        (terms.total + ce.sum()).backward()
        results.append((terms, leaf.grad))
    (one, grad_one), (chunked, grad_chunked) = results
    assert (one.n_mle, one.n_rto) == (chunked.n_mle, chunked.n_rto) == (3 * 33 - 10 - 15, 15)
    assert torch.allclose(one.total, chunked.total) and torch.allclose(one.rto, chunked.rto)
    assert torch.allclose(grad_one, grad_chunked, atol=1e-6)
    mle_terms, rto_terms = _manual(logits, labels, rto)
    assert math.isclose(one.mle.item(), sum(mle_terms) / len(mle_terms), rel_tol=1e-5)


def test_loss_from_hidden_states_equals_loss_from_full_logits():
    """The training path (final hidden states + lm_head on supervised rows only, no [B, T, V] logits) gives the
    same terms and the same parameter gradients as the full-logits path, chunked or not."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from derta import losses
    from derta.losses import hidden_only_kwargs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    tokens = torch.randint(0, 50, (2, 9))
    labels = tokens.clone()
    labels[:, :3] = X
    rto = torch.zeros_like(labels, dtype=torch.bool)
    rto[1, 3:] = True
    full = derta_loss(model(input_ids=tokens).logits, labels, rto)
    full.total.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    for chunk in (10_000, 4):
        model.zero_grad()
        out = model(input_ids=tokens, **hidden_only_kwargs("cpu"))
        assert out.logits.numel() == 0
        original, losses.CE_CHUNK_ROWS = losses.CE_CHUNK_ROWS, chunk
        try:
            terms = derta_loss(out.hidden_states[-1], labels, rto, lm_head=model.get_output_embeddings())
        finally:
            losses.CE_CHUNK_ROWS = original
        terms.total.backward()
        assert (terms.n_mle, terms.n_rto) == (full.n_mle, full.n_rto) == (6, 6)
        assert torch.allclose(terms.total, full.total, atol=1e-6)
        for name, p in model.named_parameters():
            assert torch.allclose(p.grad, expected[name], atol=1e-6), name
