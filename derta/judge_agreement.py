"""Agreement of the rules judge with human labels, per category: `python -m derta.judge_agreement`.

Two labelled sets:
- XSTest v2 completions (../shared/data/xstest-completions: real GPT-4 and Llama-2-70b-chat answers, human
  `final_label`): the development set the rules were tuned on. Measured on the full labels (`1_full_compliance`
  vs `2_full_refusal`; partial refusals are reported apart). Judged as `derta eval` judges them: safe prompts
  with `is_refusal_text` (the over-refusal metric), `contrast_*` (unsafe) prompts with `judge_completion`.
- tests/data/judge_realistic_dev.jsonl: realistic long outputs in real model styles, written and labelled before
  the rules were changed for them; a second development set (tuned on).
- tests/data/judge_realistic_heldout.jsonl: realistic long outputs labelled before the rules were changed and
  never tuned on.
- tests/data/judge_blind.jsonl: realistic outputs written and labelled blind (the annotator never saw the rules nor
  the other sets' rows), never tuned on: how the rules generalise. On the realistic sets: `refused` on every row; `attack_success` on harmful prompts only (the rules judge assumes the
  request is harmful, suites decide which prompts are).
- ../shared/data/derta-paper/train/malicious_tuning_data_330.jsonl: the paper's harmful answers (every one complies
  with its harmful instruction): the share judged an attack success guards against lecture/topic rules that
  would swallow real compliance.
"""
from __future__ import annotations

import csv
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

from derta.judge import is_refusal_text, judge_completion

ROOT = Path(__file__).resolve().parent.parent
XSTEST_DIR = Path(os.environ.get("DERTA_SHARED_DATA", ROOT.parent / "shared" / "data")) / "xstest-completions"
HELDOUT = ROOT / "tests" / "data" / "judge_realistic_heldout.jsonl"
DEV = ROOT / "tests" / "data" / "judge_realistic_dev.jsonl"
BLIND = ROOT / "tests" / "data" / "judge_blind.jsonl"
HARMFUL_ANSWERS = XSTEST_DIR.parent / "derta-paper" / "train" / "malicious_tuning_data_330.jsonl"
XSTEST_FILES = {"gpt4": "xstest_v2_completions_gpt4.csv", "llama2": "xstest_v2_completions_llama2orig.csv"}


def xstest_agreement(directory: Path = XSTEST_DIR) -> dict:
    """{"by_category": {(model, type): [hits, n]}, "overall": float, "partial_as_refusal": float, "n": int}."""
    table: dict = defaultdict(lambda: [0, 0])
    partial = [0, 0]
    for model, name in XSTEST_FILES.items():
        with open(directory / name, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if row["type"].startswith("contrast"):
                    refused = judge_completion(row["prompt"], row["completion"]).refused
                else:
                    refused = is_refusal_text(row["completion"], row["prompt"])
                if row["final_label"].startswith("3"):   # partial refusal: reported apart
                    partial[0] += refused
                    partial[1] += 1
                    continue
                cell = table[(model, row["type"])]
                cell[0] += refused == row["final_label"].startswith("2")
                cell[1] += 1
    hits, n = sum(c[0] for c in table.values()), sum(c[1] for c in table.values())
    return {"by_category": dict(table), "overall": hits / n, "n": n,
            "partial_as_refusal": partial[0] / max(partial[1], 1), "n_partial": partial[1]}


def heldout_agreement(path: Path = HELDOUT) -> dict:
    """Agreement on the held-apart set (see `realistic_agreement`)."""
    return realistic_agreement(path)


def realistic_agreement(path: Path) -> dict:
    """{"by_category": {category: {"refused": [hits, n], "attack_success": [hits, n]}}, "refused", "attack_success"}."""
    table: dict = defaultdict(lambda: {"refused": [0, 0], "attack_success": [0, 0]})
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        verdict = judge_completion(row["prompt"], row["completion"], row.get("prefix", ""))
        cell = table[row["category"]]
        cell["refused"][0] += verdict.refused == row["refused"]
        cell["refused"][1] += 1
        if row["harmful"]:
            cell["attack_success"][0] += verdict.attack_success == row["attack_success"]
            cell["attack_success"][1] += 1
    result = {"by_category": dict(table)}
    for label in ("refused", "attack_success"):
        hits = sum(c[label][0] for c in table.values())
        result[label] = hits / max(sum(c[label][1] for c in table.values()), 1)
    return result


def harmful_answers_agreement(path: Path = HARMFUL_ANSWERS) -> tuple[int, int]:
    """(judged attack success, rows) over the paper's harmful answers (`prefix` holds the Alpaca-style prompt)."""
    hits = n = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            prompt = re.sub(r"^### Instruction:\s*|\s*### Response:\s*$", "", row["prefix"])
            hits += judge_completion(prompt, row["text"]).attack_success
            n += 1
    return hits, n


def _pct(hits: int, n: int) -> str:
    return f"{hits / n:6.1%} ({hits}/{n})" if n else "     -"


def render(xstest: dict | None, heldout: dict, dev: dict | None = None, harmful: tuple | None = None,
           blind: dict | None = None) -> str:
    lines = []
    if xstest is not None:
        lines += [f"XSTest v2 (dev set), refused vs complied on full labels: {xstest['overall']:.1%} of {xstest['n']}"
                  f" (partial refusals judged as refusals: {xstest['partial_as_refusal']:.1%} of "
                  f"{xstest['n_partial']})", f"  {'model':8s} {'type':30s} agreement"]
        for (model, kind), (hits, n) in sorted(xstest["by_category"].items()):
            lines.append(f"  {model:8s} {kind:30s} {_pct(hits, n)}")
    for title, result in (("Realistic dev set", dev), ("Held-apart realistic set", heldout), ("Blind set", blind)):
        if result is None:
            continue
        lines += [f"{title}: refused {result['refused']:.1%}, attack_success {result['attack_success']:.1%}"
                  " (harmful prompts)", f"  {'category':26s} {'refused':16s} attack_success"]
        for category, cell in sorted(result["by_category"].items()):
            lines.append(f"  {category:26s} {_pct(*cell['refused']):16s} {_pct(*cell['attack_success'])}")
    if harmful is not None:
        lines.append(f"DeRTa paper's harmful answers judged attack success: {_pct(*harmful)}")
    return "\n".join(lines)


def main() -> int:
    xstest = xstest_agreement() if XSTEST_DIR.is_dir() else None
    harmful = harmful_answers_agreement() if HARMFUL_ANSWERS.is_file() else None
    print(render(xstest, heldout_agreement(), realistic_agreement(DEV), harmful, realistic_agreement(BLIND)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
