"""Mean and 95% interval over seeds of `derta eval` summaries (`derta experiment --seeds N`).

    mean_summary([summary_seed0, summary_seed1, ...])  -> same shape, every rate the mean over seeds
    interval_summary([...])                           -> same shape, every rate [low, high] (None for one seed)

A summary is {model: {suite: {metric: value | {k: value}}}}. The interval is Student's t interval over the
per-seed values, mean +- t(0.975, n-1) * sd / sqrt(n), clipped to [0, 1]: it describes the run-to-run spread
of the whole pipeline (model init, data order), with the evaluation items fixed. Counts (`n`, `n_by_prefix`) are
the same for every seed (same items) and are kept from the first summary. A value that is None in some seeds
(no item at that k) is averaged over the seeds that have it.
"""
from __future__ import annotations

import math

# t(0.975, df) for df = 1..30; beyond, the normal 1.96
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
COUNT_KEYS = ("n", "n_by_prefix")


def t_quantile(df: int) -> float:
    return T_975[df - 1] if df <= len(T_975) else 1.96


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def interval(values: list[float]) -> list[float] | None:
    """[low, high] of the 95% t interval of the mean, clipped to [0, 1]; None with fewer than two values."""
    if len(values) < 2:
        return None
    centre = mean(values)
    sd = math.sqrt(sum((v - centre) ** 2 for v in values) / (len(values) - 1))
    half = t_quantile(len(values) - 1) * sd / math.sqrt(len(values))
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def _combine(values: list, reduce):
    """Recurse through dicts; numbers (None skipped) go to `reduce`."""
    first = values[0]
    if isinstance(first, dict):
        return {key: _combine([v.get(key) for v in values if isinstance(v, dict)], reduce) for key in first}
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return reduce(numbers)


def _over_seeds(summaries: list[dict], reduce) -> dict:
    if not summaries:
        raise ValueError("no per-seed summaries to aggregate")
    out: dict = {}
    for model, suites in summaries[0].items():
        out[model] = {}
        for suite, metrics in suites.items():
            per_seed = [s.get(model, {}).get(suite, {}) for s in summaries]
            out[model][suite] = {key: (value if key in COUNT_KEYS else _combine([m.get(key) for m in per_seed], reduce))
                                 for key, value in metrics.items()}
    return out


def mean_summary(summaries: list[dict]) -> dict:
    return _over_seeds(summaries, lambda xs: None if not xs else round(mean(xs), 4))


def interval_summary(summaries: list[dict]) -> dict:
    return _over_seeds(summaries, interval)


def mean_curves(curves: list[dict]) -> dict:
    """{model: [mean P(refusal) at each position]} over seeds (curves of equal length per model)."""
    return {model: [round(mean([c[model][i] for c in curves if i < len(c.get(model, []))]), 4)
                    for i in range(len(points))] for model, points in curves[0].items()}
