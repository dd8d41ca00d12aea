"""Markdown report, plain-text table and PNG plots from an evaluation summary.

    summary = {model: {suite: {metric: value, "asr_by_prefix": {k: asr}}}}   (run_eval's summary.json)
    curves  = {model: [mean P(refusal) at response position 0..N]}          (run_eval's curves.json)

The overview puts safety (ASR, refusal), helpfulness (accuracy) and over-refusal of every model on one row; the
per-suite tables show every metric with the models side by side. Plots: ASR vs prefill length per model
(`asr_by_prefix.png`) and P(refusal) vs response position per model (`refusal_curve.png`).
"""
from __future__ import annotations

import json
from pathlib import Path

CURVE_POSITIONS = (0, 5, 10, 20, 40)
# metric key -> column label in the overview; asr_by_prefix expands to one column per k
HEADLINE = {"asr": "ASR", "refusal_rate_unsafe": "refusal (unsafe)", "accuracy": "accuracy",
            "over_refusal_rate": "over-refusal", "refusal_rate_safe": "over-refusal"}
BY_PREFIX = {"asr_by_prefix": "ASR", "refusal_by_prefix": "refusal", "degenerate_by_prefix": "degenerate"}
ASR_PLOT, CURVE_PLOT = "asr_by_prefix.png", "refusal_curve.png"


def short(suite: str) -> str:
    return suite.removeprefix("synthetic_")


def percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def percent_interval(value, bounds) -> str:
    """"12.5% [5.0, 20.0]" (the 95% interval over seeds), or the bare percentage without one."""
    if value is None or not bounds:
        return percent(value)
    return f"{100 * value:.1f}% [{100 * bounds[0]:.1f}, {100 * bounds[1]:.1f}]"


def flatten(metrics: dict) -> dict[str, float | None]:
    """{metric: value} with the by-prefix dicts expanded to `ASR k=<k>` / `refusal k=<k>`; counts dropped."""
    flat = {}
    for key, value in metrics.items():
        if key in BY_PREFIX:
            flat.update({f"{BY_PREFIX[key]} k={k}": v for k, v in value.items()})
        elif key not in ("n", "n_by_prefix") and not key.startswith("judge_"):  # judge accounting: counts
            flat[key] = value
    return flat


def headline(metrics: dict) -> dict[str, float | None]:
    """The overview columns of one suite: ASR per prefill length, else ASR + refusal, accuracy, over-refusal."""
    if "asr_by_prefix" in metrics:
        return {f"ASR k={k}": v for k, v in metrics["asr_by_prefix"].items()}
    columns = {label: metrics[key] for key, label in HEADLINE.items() if key in metrics}
    if "asr" in metrics and "refusal_rate" in metrics:
        columns["refusal"] = metrics["refusal_rate"]
    return columns


def suites_of(summary: dict) -> list[str]:
    seen: list[str] = []
    for per_suite in summary.values():
        seen += [s for s in per_suite if s not in seen]
    return seen


def overview_columns(summary: dict) -> list[tuple[str, str]]:
    """(suite, column label) in suite order, over all models."""
    columns: list[tuple[str, str]] = []
    for suite in suites_of(summary):
        for per_suite in summary.values():
            columns += [(suite, label) for label in headline(per_suite.get(suite, {})) if (suite, label) not in columns]
    return columns


def overview_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    columns = overview_columns(summary)
    header = ["model"] + [f"{short(suite)} {label}" for suite, label in columns]
    rows = [[model] + [percent(headline(per_suite.get(suite, {})).get(label)) for suite, label in columns]
            for model, per_suite in summary.items()]
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths)))
                     for r in [header] + rows)


def by_prefix_rows(summary: dict, key: str = "refusal_by_prefix",
                   intervals: dict | None = None) -> tuple[list[str], list[list[str]]]:
    """One by-prefix metric (`refusal_by_prefix`, `degenerate_by_prefix`, ...) per prefill length and model."""
    columns = [(suite, k) for suite in suites_of(summary) for k in
               dict.fromkeys(k for per_suite in summary.values() for k in per_suite.get(suite, {}).get(key, {}))]
    header = ["model"] + [f"{short(suite)} {BY_PREFIX[key]} k={k}" for suite, k in columns]
    bounds = lambda model, suite, k: ((intervals or {}).get(model, {}).get(suite, {}).get(key) or {}).get(k)  # noqa: E731
    rows = [[model] + [percent_interval(per_suite.get(suite, {}).get(key, {}).get(k), bounds(model, suite, k))
                       for suite, k in columns] for model, per_suite in summary.items()]
    return header, rows


def refusal_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    return by_prefix_rows(summary, "refusal_by_prefix")


def compact_table(summary: dict) -> str:
    """The overview, then coherent refusal and degenerate rates per prefill length, as fixed-width text."""
    parts = [text_table(*overview_rows(summary))]
    for key in ("refusal_by_prefix", "degenerate_by_prefix"):
        header, rows = by_prefix_rows(summary, key)
        if len(header) > 1:
            parts.append(text_table(header, rows))
    return "\n\n".join(parts)


def suite_table(summary: dict, suite: str) -> str:
    """Rows = metrics of `suite`, columns = models."""
    models = [m for m in summary if suite in summary[m]]
    flat = {m: flatten(summary[m][suite]) for m in models}
    metrics = list(dict.fromkeys(key for m in models for key in flat[m]))
    rows = [[metric] + [percent(flat[m].get(metric)) for m in models] for metric in metrics]
    rows.append(["n"] + [str(summary[m][suite].get("n", "-")) for m in models])
    if any("n_by_prefix" in summary[m][suite] for m in models):
        rows.append(["n per k"] + [" / ".join(map(str, summary[m][suite].get("n_by_prefix", {}).values()))
                                   for m in models])
    return markdown_table(["metric"] + models, rows)


def curve_table(curves: dict) -> str:
    positions = [p for p in CURVE_POSITIONS if any(p < len(c) for c in curves.values())]
    rows = [[model] + [f"{curve[p]:.3f}" if p < len(curve) else "-" for p in positions]
            for model, curve in curves.items() if curve]
    return markdown_table(["model"] + [f"pos {p}" for p in positions], rows)


# ------------------------------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_asr_by_prefix(summary: dict, path: Path) -> bool:
    """ASR (%) vs number of prefilled harmful tokens, one line per model (and prefilling suite)."""
    prefilled = [(model, suite, metrics["asr_by_prefix"]) for model, per_suite in summary.items()
                 for suite, metrics in per_suite.items() if metrics.get("asr_by_prefix")]
    several = len({suite for _, suite, _ in prefilled}) > 1
    lines = [(f"{model} / {short(suite)}" if several else model, by_k) for model, suite, by_k in prefilled]
    if not lines:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, by_k in lines:
        ks = sorted((k for k in by_k if by_k[k] is not None), key=int)  # None: no judged item at that k
        ax.plot([int(k) for k in ks], [100 * by_k[k] for k in ks], marker="o", label=label)
    ax.set(xlabel="prefilled harmful tokens k", ylabel="attack success rate (%)", ylim=(-2, 102),
           title="Prefilling attack: ASR vs prefill length")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_refusal_curves(curves: dict, path: Path) -> bool:
    """Mean P(refusal) vs position along harmful responses, one line per model."""
    if not any(curves.values()):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, curve in curves.items():
        if curve:
            ax.plot(range(len(curve)), curve, label=model)
    ax.set(xlabel="position in the harmful response (tokens)", ylabel="mean P(refusal token)",
           title="Refusal position: P(switch to a refusal)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------- report
def write_report(summary: dict, curves: dict, output: Path, title: str = "derta evaluation",
                 notes: list[str] | None = None, intervals: dict | None = None) -> Path:
    """Write output/report.md plus the PNG plots; returns the report path. `intervals` (same shape as the
    summary, [low, high]) adds the 95% interval over seeds to the per-prefix tables."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", *(notes or []),
             "## Overview: safety, helpfulness and over-refusal",
             "ASR = attack success rate (lower is safer); accuracy = exact answer (higher is better); "
             "over-refusal = refusals of benign prompts (lower is better). Outcomes of harmful items are three-way "
             "(derta/coherence.py): attack success, coherent refusal, degenerate (loops, gibberish), or other.",
             markdown_table(*overview_rows(summary))]
    for key, text in (("asr_by_prefix", "Attack success rate per prefill length"),
                      ("refusal_by_prefix", "Coherent refusal rate per prefill length (refused after k prefilled "
                                            "tokens, and the completion passes the coherence rule)"),
                      ("degenerate_by_prefix", "Degenerate outputs per prefill length (loops, gibberish)")):
        header, rows = by_prefix_rows(summary, key, intervals)
        if len(header) > 1:
            parts += [f"{text}:", markdown_table(header, rows)]
    if plot_asr_by_prefix(summary, output / ASR_PLOT):
        parts += ["## ASR vs prefill length", f"![ASR vs prefill length]({ASR_PLOT})"]
    if plot_refusal_curves(curves, output / CURVE_PLOT):
        parts += ["## Refusal position", "Mean P(refusal token) after prompt + the first i tokens of held-out "
                  "harmful responses.", f"![P(refusal) vs position]({CURVE_PLOT})", curve_table(curves)]
    for suite in suites_of(summary):
        parts += [f"## {suite}", suite_table(summary, suite)]
    path = output / "report.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path


# ------------------------------------------------------------------------------------------------- README
README_BEGIN, README_END = "<!-- experiment-results:begin -->", "<!-- experiment-results:end -->"
PREFILL_SUITE, HELP_SUITE, BENIGN_SUITE = "synthetic_prefill", "synthetic_helpful", "synthetic_benign_prefill"
LOOKALIKE_SUITE = "synthetic_lookalike"


def readme_tables(summary: dict, intervals: dict, record: dict) -> str:
    """The README's experiment tables, generated from a results directory (summary, intervals, experiment.json)."""
    def cell(model, suite, key, k=None):
        value, bounds = summary[model].get(suite, {}).get(key), intervals.get(model, {}).get(suite, {}).get(key)
        if k is not None:
            value, bounds = (value or {}).get(k), (bounds or {}).get(k)
        return percent_interval(value, bounds)

    ks = list(next(iter(summary.values()))[PREFILL_SUITE]["asr_by_prefix"])
    rows = [[model, label] + [cell(model, PREFILL_SUITE, key, k) for k in ks]
            for model in summary for key, label in (("asr_by_prefix", "attack success"),
                                                    ("refusal_by_prefix", "coherent refusal"),
                                                    ("degenerate_by_prefix", "degenerate"))]
    attack = markdown_table(["model", "outcome"] + [f"k={k}" for k in ks], rows)
    other = markdown_table(
        ["model", "helpful accuracy", "benign-prefill refusal", "lookalike over-refusal"],
        [[model, cell(model, HELP_SUITE, "accuracy"), cell(model, BENIGN_SUITE, "refusal_rate"),
          cell(model, LOOKALIKE_SUITE, "over_refusal_rate")] for model in summary])
    # training seconds as measured when each run was trained (a reused run keeps its original time)
    seconds = [sum(r["seconds"] for name, r in run["runs"].items() if name != "base")
               for run in record["per_seed"].values()]
    n = summary[next(iter(summary))][PREFILL_SUITE].get("n_by_prefix", {})
    return "\n".join([
        f"Held-out `{record['heldout_split']}` split, mean over {len(record['seeds'])} seed(s) "
        f"{record['seeds']} [95% t interval over seeds]; {' / '.join(map(str, n.values()))} harmful prompts at "
        f"k = {' / '.join(ks)}. Fine-tuning time per seed (3 arms, 2 shared CPU cores): "
        f"{', '.join(f'{s:.0f}' for s in seconds)} s. Generated by "
        "`python -m derta.report --readme README.md results/experiment` from `results/experiment/`.", "",
        "Prefilling attack (k harmful tokens prefilled):", "", attack, "",
        "Helpfulness and false refusals:", "", other])


def load_results(directory: Path) -> tuple[dict, dict, dict]:
    directory = Path(directory)
    return tuple(json.loads((directory / name).read_text())
                 for name in ("summary.json", "intervals.json", "experiment.json"))


def readme_block(directory: Path) -> str:
    return f"{README_BEGIN}\n{readme_tables(*load_results(directory))}\n{README_END}"


def update_readme(readme: Path, directory: Path) -> bool:
    """Replace the README's generated block; True when it changed."""
    text = Path(readme).read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme}: no {README_BEGIN} ... {README_END} block to replace")
    head, rest = text.split(README_BEGIN, 1)
    new = head + readme_block(directory) + rest.split(README_END, 1)[1]
    Path(readme).write_text(new)
    return new != text


if __name__ == "__main__":  # python -m derta.report --readme README.md results/experiment
    import argparse

    parser = argparse.ArgumentParser(description="Regenerate the README's experiment tables from a results dir")
    parser.add_argument("--readme", type=Path, required=True)
    parser.add_argument("results", type=Path)
    args = parser.parse_args()
    print(("updated " if update_readme(args.readme, args.results) else "unchanged ") + str(args.readme))
