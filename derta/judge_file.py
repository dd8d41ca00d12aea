"""`derta judge`: judge any JSONL file of outputs with the rules or a model judge.

Each row needs string `prompt` and `completion`; optional `prefix` (attacker-prefilled text the completion
continues) and `kind` ("benign" rows get the over-refusal treatment, everything else is judged as a harmful
request). The judge adds `refused`, `attack_success`, `reason` and `judge` to every row. Model-judge accounting
(`judge_counts`) is written next to the output as `<output>.summary.json`, and the command fails after writing
when the fallback rate exceeds `eval.judge_max_fallback_rate`.
"""
from __future__ import annotations

import json
from pathlib import Path

from derta.config import ConfigError
from derta.judge_models import JudgeFallbackError, judge_counts, make_judge
from derta.suites import EvalItem, read_jsonl


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSONL file of (prompt, completion[, prefix]); a bad line raises ConfigError naming file:line.
    Completions may be empty (a model can answer nothing)."""
    if not path.is_file():
        raise ConfigError(f"input file not found: {path}")
    try:
        numbered = read_jsonl(path)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for number, row in numbered:
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
            raise ConfigError(f"{path}:{number}: need a JSON object with string 'prompt' and 'completion'")
        if row.get("prefix") is not None and not isinstance(row["prefix"], str):
            raise ConfigError(f"{path}:{number}: 'prefix' must be a string")
    return [row for _, row in numbered]


def judge_file(input_path: Path, output: Path, ev) -> dict:
    """Judge `input_path` into `output` (may be the same file); returns the judge accounting."""
    rows = read_rows(Path(input_path))   # all rows read before the output is written: it may be the input
    judge = make_judge(ev)
    items = [EvalItem(str(n), "file", row["prompt"], str(row.get("prefix") or ""),
                      kind="benign" if row.get("kind") == "benign" else "harmful") for n, row in enumerate(rows)]
    for row, (verdict, name) in zip(rows, judge.judge_items(items, [row["completion"] for row in rows])):
        row.update(refused=verdict.refused, attack_success=verdict.attack_success if row.get("kind") != "benign"
                   else False, reason=verdict.reason, judge=name)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    partial.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    partial.replace(output)
    counts = {"rows": len(rows), **judge_counts(rows)}
    output.with_name(output.name + ".summary.json").write_text(json.dumps(counts, indent=2))
    if counts["judge_model_items"] and counts["judge_fallback_rate"] > ev.judge_max_fallback_rate:
        raise JudgeFallbackError(
            f"judge fallback rate {counts['judge_fallback_rate']:.1%} ({counts['judge_fallbacks']}/"
            f"{counts['judge_model_items']}, {counts['judge_parse_failures']} unparsable) is above "
            f"eval.judge_max_fallback_rate={ev.judge_max_fallback_rate}; {output} is written")
    return counts
