"""`derta demo`: the refusal-position bias in one picture, on the embedded default (tiny model, synthetic corpus, CPU).

Trains the same tiny model twice with the same steps and data budget: `vanilla` (helpful + harmful prompt ->
refusal) and `derta` (helpful + harmful-prefix MLE + RTO), then probes both on held-out harmful prompts: P(refusal)
after the prompt plus the first k tokens of a harmful response, k in KS. A vanilla model refuses at k = 0 and hardly
ever once a harmful prefix is in place; DeRTa refuses at every k. As a control, P(refusal) at k = 0 on held-out
helpful prompts (a model that refuses everything would also score high on harmful ones). Prints the table and writes
OUTPUT/refusal_by_k.png, OUTPUT/demo_summary.json.
"""
from __future__ import annotations

import json
from pathlib import Path

from derta.config import DertaConfig

KS = (0, 5, 10, 20, 40)
MODES = ("vanilla", "derta")
PLOT = "refusal_by_k.png"


def refusal_curves(model_paths: dict[str, str], items: list[tuple[str, str]], cfg: DertaConfig,
                   max_positions: int = max(KS)) -> dict[str, list[float]]:
    """Mean P(refusal) vs position along the (instruction, response) `items`, per model (shared probe math)."""
    from derta.modeling import load_model, load_tokenizer
    from derta.probe import mean_refusal_curve
    from derta.transforms import PromptRenderer, refusal_token_ids

    curves = {}
    for name, path in model_paths.items():
        tokenizer = load_tokenizer(path)
        renderer = PromptRenderer(tokenizer, cfg.data.use_chat_template, cfg.data.plain_template)
        refusal_ids = refusal_token_ids(tokenizer, cfg.data.probe_refusal_strings)
        model = load_model(path, cfg.model).eval()
        pairs = [(renderer.encode_prompt(renderer.render(instruction)),
                  tokenizer.encode(response, add_special_tokens=False)) for instruction, response in items]
        curves[name] = mean_refusal_curve(model, pairs, refusal_ids, max_positions)
    return curves


def plot_refusal_by_k(curves: dict[str, list[float]], path: Path, n_prompts: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for (name, curve), color in zip(curves.items(), ("tab:red", "tab:blue", "tab:green", "tab:purple")):
        ax.plot(range(len(curve)), curve, color=color, alpha=0.35, linewidth=1)
        ks = [k for k in KS if k < len(curve)]
        ax.plot(ks, [curve[k] for k in ks], color=color, marker="o", linewidth=2, label=name)
    ax.set(xlabel="k = harmful-response tokens already in the reply", ylabel="P(refusal token next)",
           ylim=(-0.02, 1.02), xticks=list(KS),
           title=f"Refusal position bias (tiny model, {n_prompts} held-out harmful prompts)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(cfg: DertaConfig, output: Path, n_prompts: int = 64) -> dict:
    from derta.progress import say
    from derta.synthetic import generate_corpus
    from derta.trainer import run_training

    output = Path(output)
    finals = {}
    for mode in MODES:  # same preset, steps and lr; only the data mode differs
        data = "helpful + harmful prompt -> refusal" if mode == "vanilla" else "helpful + harmful-prefix MLE + RTO"
        say(f"training {mode} ({data})")
        mode_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"mode": mode})})
        finals[mode] = str(run_training(mode_cfg, output / mode))
    corpus = generate_corpus(**cfg.data.synthetic.model_dump())
    heldout = corpus["heldout_safety"][:n_prompts]
    say(f"probing P(refusal) after k harmful tokens on {len(heldout)} held-out harmful prompts")
    curves = refusal_curves(finals, [(r["instruction"], r["harmful_response"]) for r in heldout], cfg)
    # the control: a model that says "Sorry" to everything would also score high on the harmful prompts
    helpful = corpus["heldout_helpful"][:n_prompts]
    benign = {name: round(curve[0], 3) for name, curve in
              refusal_curves(finals, [(r["instruction"], "") for r in helpful], cfg, max_positions=0).items()}
    output.mkdir(parents=True, exist_ok=True)
    plot_refusal_by_k(curves, output / PLOT, len(heldout))
    by_k = {name: {str(k): round(curve[k], 3) for k in KS if k < len(curve)} for name, curve in curves.items()}
    summary = {"models": finals, "prompts": len(heldout), "p_refusal_after_k_harmful_tokens": by_k,
               "helpful_prompts": len(helpful), "p_refusal_helpful_prompt": benign, "plot": str(output / PLOT)}
    (output / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nP(refusal) after the prompt + k tokens of a held-out harmful response (mean over {len(heldout)} prompts)")
    print(f"{'model':>8} " + " ".join(f"{'k=' + str(k):>6}" for k in KS))
    for name, values in by_k.items():
        print(f"{name:>8} " + " ".join(f"{values[str(k)]:>6.2f}" for k in KS if str(k) in values))
    print(f"control, P(refusal) at k=0 on {len(helpful)} held-out helpful prompts: "
          + ", ".join(f"{name} {p:.2f}" for name, p in benign.items()))
    print(f"\nplot: {output / PLOT}\nmodels: {finals['vanilla']}  {finals['derta']}\n"
          f"next: derta probe --model {finals['derta']} --input pairs.jsonl --output runs/probe   |   "
          f"derta experiment --output runs/experiment")
    return summary
