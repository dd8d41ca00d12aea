"""`derta demo`: the embedded default end to end on CPU, then a before/after look at refusal positions."""
from __future__ import annotations

import json
from pathlib import Path

from derta.config import DertaConfig


def refusal_curves(model_paths: dict[str, str], heldout_safety: list[dict], cfg: DertaConfig,
                   max_positions: int = 48) -> dict[str, list[float]]:
    """Mean P(refusal) vs position along held-out harmful responses, per model (shared probe math)."""
    from derta.modeling import load_model, load_tokenizer
    from derta.probe import mean_refusal_curve
    from derta.transforms import PromptRenderer, refusal_token_ids

    curves = {}
    for name, path in model_paths.items():
        tokenizer = load_tokenizer(path)
        renderer = PromptRenderer(tokenizer, cfg.data.use_chat_template, cfg.data.plain_template)
        refusal_ids = refusal_token_ids(tokenizer, cfg.data.probe_refusal_strings)
        model = load_model(path, cfg.model).eval()
        pairs = [(renderer.encode_prompt(renderer.render(row["instruction"])),
                  tokenizer.encode(row["harmful_response"], add_special_tokens=False)) for row in heldout_safety]
        curves[name] = mean_refusal_curve(model, pairs, refusal_ids, max_positions)
    return curves


def run_demo(cfg: DertaConfig, output: Path) -> dict:
    from derta.modeling import resolve_model_path
    from derta.synthetic import generate_corpus
    from derta.trainer import run_training

    output = Path(output)
    base_path = resolve_model_path(cfg.model, cfg.data.synthetic, cfg.data.refusal_string)
    final = run_training(cfg, output)
    heldout = generate_corpus(**cfg.data.synthetic.model_dump())["heldout_safety"][:64]
    curves = refusal_curves({"untrained": base_path, "derta": str(final)}, heldout, cfg)
    summary = {"final_model": str(final), "mean_p_refusal_along_harmful_response": {
        name: {f"pos{i}": round(curve[i], 3) for i in (0, 5, 10, 20, 40) if i < len(curve)}
        for name, curve in curves.items()}}
    (output / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print("\nP(refusal) after prompt + k tokens of a held-out harmful response (mean over 64 prompts):")
    print(f"{'model':>10} " + " ".join(f"k={i:<5}" for i in (0, 5, 10, 20, 40)))
    for name, curve in curves.items():
        print(f"{name:>10} " + " ".join(f"{curve[i]:<7.3f}" for i in (0, 5, 10, 20, 40) if i < len(curve)))
    print(f"\nmodel: {final}\nnext: derta serve --model {final}   |   derta experiment --output runs/experiment")
    return summary
