"""Seed aggregation (mean, 95% t interval) and the committed experiment results behind the README table."""
from __future__ import annotations

import pytest

from derta.aggregate import interval, interval_summary, mean_curves, mean_summary, t_quantile


def seed_summary(asr0, asr10, acc):
    return {"derta": {"synthetic_prefill": {"n": 8, "asr_by_prefix": {"0": asr0, "10": asr10},
                                            "n_by_prefix": {"0": 4, "10": 4}},
                      "synthetic_helpful": {"n": 4, "accuracy": acc}}}


def test_interval_is_students_t_over_seeds():
    values = [0.2, 0.3, 0.4]
    low, high = interval(values)
    half = t_quantile(2) * 0.1 / 3 ** 0.5  # sd = 0.1
    assert low == pytest.approx(0.3 - half, abs=1e-4) and high == pytest.approx(min(1.0, 0.3 + half), abs=1e-4)
    assert interval([0.5]) is None and interval([0.0, 0.0]) == [0.0, 0.0]
    assert interval([0.95, 1.0, 1.0])[1] == 1.0  # clipped to [0, 1]


def test_mean_and_interval_summaries_keep_the_eval_shape():
    summaries = [seed_summary(0.0, 0.5, 0.25), seed_summary(0.1, None, 0.75)]
    mean = mean_summary(summaries)
    assert mean["derta"]["synthetic_prefill"]["asr_by_prefix"] == {"0": 0.05, "10": 0.5}  # None: seeds that have it
    assert mean["derta"]["synthetic_prefill"]["n_by_prefix"] == {"0": 4, "10": 4}       # counts kept, not averaged
    assert mean["derta"]["synthetic_helpful"] == {"n": 4, "accuracy": 0.5}
    bounds = interval_summary(summaries)["derta"]
    assert bounds["synthetic_prefill"]["asr_by_prefix"]["10"] is None
    assert bounds["synthetic_helpful"]["accuracy"][0] == 0.0
    assert mean_curves([{"m": [0.0, 1.0]}, {"m": [1.0, 0.0]}]) == {"m": [0.5, 0.5]}


def test_training_reuse_key_ignores_only_what_an_arm_does_not_use():
    from derta.config import load_config
    from derta.experiment import training_key, with_updates

    cfg = load_config("experiment")
    vanilla, derta = with_updates(cfg, data={"mode": "vanilla"}), with_updates(cfg, data={"mode": "derta"})
    rto = {"train": {"rto_weight": 0.3}}
    assert training_key(vanilla) == training_key(with_updates(vanilla, **rto, data={"k0_fraction": 0.1}))
    assert training_key(derta) != training_key(with_updates(derta, **rto))
    assert training_key(derta) != training_key(with_updates(derta, data={"k0_fraction": 0.1}))
    assert training_key(derta) == training_key(with_updates(derta, eval={"heldout_split": "dev"}))
