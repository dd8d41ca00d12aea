"""`derta probe`: the refusal-position probe of `/probe` over a file, without a server.

Input: JSONL, one object per line with the fields of a `/probe` request body: `prompt` (one user turn, rendered with
the chat template) or `messages` (a chat), `response` (the text to probe along), optional `threshold`, and an
optional `id` that is copied to the output. Every position i = 0..N of the response gets P(the next token starts a
refusal) after prompt + response[:i], from one forward pass (`derta.probe.probe`, the function /probe runs).

Output: DIR/curves.jsonl (one line per input line, same order), DIR/refusal_curves.png (every item faint, the mean
bold), DIR/summary.json (mean curve, items, model). A malformed line stops the run with file:line and the field.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from derta.config import ConfigError, DertaConfig

CURVES, PLOT, SUMMARY = "curves.jsonl", "refusal_curves.png", "summary.json"


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class ProbeItem(BaseModel):
    """One input line: the /probe request body (`model` and `verify` are server-only and not accepted here)."""
    model_config = ConfigDict(extra="forbid")
    id: str | int | None = None
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    response: str
    threshold: float | None = Field(None, gt=0, lt=1, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


def read_items(path: Path) -> list[tuple[int, ProbeItem]]:
    """(line number, item) for every non-blank line; the first bad line is a ConfigError naming file:line."""
    if not path.exists():
        raise FileNotFoundError(f"probe input not found: {path}")
    items = []
    with path.open(encoding="utf-8", errors="strict") as f:
        try:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    items.append((number, ProbeItem.model_validate_json(line)))
                except ValidationError as err:
                    problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'line'}: {e['msg']}" for e in err.errors())
                    raise ConfigError(f"{path}:{number}: {problems}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 ({err})") from None
    if not items:
        raise ConfigError(f"{path}: no items (expected JSONL lines with 'prompt' or 'messages' and 'response')")
    return items


def run_probe(cfg: DertaConfig, model: str, input_path: Path, output: Path, threshold: float | None = None) -> dict:
    from derta.modeling import load_model, load_tokenizer, resolve_model_path
    from derta.probe import probe
    from derta.progress import Progress
    from derta.transforms import PromptRenderer, refusal_token_ids

    items = read_items(Path(input_path))
    path = resolve_model_path(cfg.model.model_copy(update={"name_or_path": model}), cfg.data.synthetic,
                              cfg.data.refusal_string)
    tokenizer = load_tokenizer(cfg.model.tokenizer or path)
    renderer = PromptRenderer(tokenizer, cfg.data.use_chat_template, cfg.data.plain_template, cfg.data.system_prompt)
    refusal_ids = refusal_token_ids(tokenizer, cfg.data.probe_refusal_strings)
    net = load_model(path, cfg.model).eval()
    default_threshold = threshold or cfg.serve.probe_threshold
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    curves = []
    with (output / CURVES).open("w", encoding="utf-8") as out, \
            Progress("probe", total=len(items), unit="items") as bar:
        for number, item in items:
            try:
                prompt_ids = (renderer.encode_prompt(renderer.render_messages([m.model_dump() for m in item.messages]))
                              if item.messages else renderer.encode_prompt(renderer.render(item.prompt)))
            except Exception as err:  # e.g. a chat template that rejects the role order
                raise ConfigError(f"{input_path}:{number}: cannot render the prompt: {err}") from None
            response_ids = tokenizer.encode(item.response, add_special_tokens=False)
            limit = getattr(net.config, "max_position_embeddings", None)
            if limit and len(prompt_ids) + len(response_ids) > limit:
                raise ConfigError(f"{input_path}:{number}: prompt + response are {len(prompt_ids) + len(response_ids)} "
                                  f"tokens; the model takes at most {limit}")
            item_threshold = item.threshold or default_threshold
            result = probe(net, prompt_ids, response_ids, refusal_ids, item_threshold)
            curves.append(result.refusal_prob)
            out.write(json.dumps({
                "id": item.id, "line": number, "prompt_tokens": len(prompt_ids), "response_tokens": len(response_ids),
                "tokens": [tokenizer.decode([t]) for t in response_ids],
                "p_refusal": [round(p, 6) for p in result.refusal_prob],
                "top_tokens": [tokenizer.decode([t]) for t in result.top_token_ids],
                "first_crossing": result.first_crossing, "threshold": item_threshold,
                "min": round(result.min_prob, 6), "mean": round(result.mean_prob, 6)}) + "\n")
            bar.update()
    mean = mean_curve(curves)
    plot_curves(curves, mean, output / PLOT, title=f"{Path(path).name}: P(refusal) along {len(curves)} responses")
    summary = {"model": path, "input": str(input_path), "items": len(curves), "mean_p_refusal": mean,
               "refusal_tokens": [tokenizer.decode([i]) for i in refusal_ids], "curves": str(output / CURVES),
               "plot": str(output / PLOT)}
    (output / SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary


def mean_curve(curves: list[list[float]]) -> list[float]:
    """Mean at each position over the curves that reach it."""
    length = max(map(len, curves))
    return [round(sum(c[i] for c in curves if i < len(c)) / sum(1 for c in curves if i < len(c)), 6)
            for i in range(length)]


def plot_curves(curves: list[list[float]], mean: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for curve in curves:
        ax.plot(range(len(curve)), curve, color="tab:blue", alpha=max(0.05, min(0.5, 3 / len(curves))),
                linewidth=0.8)
    ax.plot(range(len(mean)), mean, color="black", linewidth=2, label=f"mean of {len(curves)}")
    ax.set(xlabel="response tokens so far (i)", ylabel="P(refusal token next)", ylim=(-0.02, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
