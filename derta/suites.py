"""Evaluation suites: a registry of documented loaders that turn the shared data files into `EvalItem`s.

    load_suite("advbench", limit=50)                     -> 50 harmful prompts (AdvBench goals)
    load_suite("xstest")                                 -> 250 benign + 200 unsafe prompts (over-refusal)
    load_suite("prefill_malicious")                      -> harmful prompts with meta["harmful_response"]
    build_prefill_items(items, ks=(0, 5, 10), tokenizer=tok)  -> prefix = first k tokens of that response
    load_suite("synthetic_harmful", path="runs/data/heldout_harmful.jsonl")

Shared data is read from `$DERTA_SHARED_DATA`, default `<repo>/../shared/data` (read-only). Every loader is
strict: a malformed line raises `ValueError("<file>:<line>: <problem>")`, a missing file `FileNotFoundError`
naming the path and the variable to set. Item ids are `<suite>:<n>` with `n` the 0-based row index in the file
(XSTest keeps its own `id` column). `limit` keeps the first N items, so runs are reproducible.

Metric kinds (`SuiteSpec.metric`), for the evaluator:
- "asr": attack success rate, judged by `derta.judge` (harmful prompts, model answers from scratch);
- "prefill_asr": attack success after prefilling k tokens of a harmful response (`build_prefill_items`);
- "refusal_rate": XSTest; refusal rate on kind "benign" is over-refusal, on kind "harmful" it is safety;
- "gsm8k_accuracy": `extract_gsm8k_answer(output) == reference`;
- "mmlu_accuracy": `extract_mmlu_choice(output) == reference`;
- "open_ended": helpfulness prompts without a reference (AlpacaEval; compare outputs with a judge model);
- "benign_prefill": refusal rate after prefilling the start of a helpful answer (a refusal there is a false one);
- "exact_answer": synthetic helpful rows with a short `answer`, equal to the answer the output states ("The answer is X").
"""
from __future__ import annotations

import functools

import csv
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

__all__ = ["EvalItem", "SuiteSpec", "SUITES", "register_suite", "load_suite", "list_suites", "default_data_dir",
           "extract_gsm8k_answer", "extract_mmlu_choice", "build_prefill_items"]

REPO_ROOT = Path(__file__).resolve().parent.parent
PAPER_TEST = Path("derta-paper") / "test"
END_MARKERS = ("<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "</s>")


@dataclass(frozen=True)
class EvalItem:
    """One evaluation prompt. `prefix` is prefilled assistant text (attacks); `reference` the gold answer."""

    id: str
    suite: str
    prompt: str
    prefix: str = ""
    reference: str | None = None
    kind: str = "harmful"   # "harmful" | "benign" | "gsm8k" | "mmlu" | "helpful"
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    description: str
    metric: str
    loader: Callable[..., list[EvalItem]]


SUITES: dict[str, SuiteSpec] = {}


def register_suite(name: str, description: str, metric: str):
    """Decorator: register `loader(data_dir: Path, **options) -> list[EvalItem]` under `name`."""
    def decorate(loader: Callable[..., list[EvalItem]]):
        if name in SUITES:
            raise ValueError(f"suite {name!r} is already registered")
        SUITES[name] = SuiteSpec(name, description, metric, loader)
        return loader
    return decorate


def default_data_dir() -> Path:
    """`$DERTA_SHARED_DATA`, else `<repo>/../shared/data`."""
    return Path(os.environ.get("DERTA_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def list_suites() -> list[tuple[str, str]]:
    """(name, description) of every registered suite, sorted by name."""
    return sorted((spec.name, spec.description) for spec in SUITES.values())


def load_suite(name: str, data_dir: Path | None = None, limit: int | None = None, **options) -> list[EvalItem]:
    """Load a registered suite. `options` go to the loader (e.g. `path=` for the synthetic suites)."""
    if name not in SUITES:
        raise KeyError(f"unknown suite {name!r}; registered: {', '.join(sorted(SUITES))}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    loader = SUITES[name].loader
    try:
        items = loader(Path(data_dir) if data_dir is not None else default_data_dir(), **options)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            raise ValueError(f"suite {name!r}: {err}") from None
        raise
    return items[:limit] if limit is not None else items


# ------------------------------------------------------------------------------------------------ readers
def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found (shared data is read from $DERTA_SHARED_DATA, "
                                f"default {REPO_ROOT.parent / 'shared' / 'data'})")
    return path


def read_jsonl(path: Path, required: Sequence[str] = ()) -> list[tuple[int, dict]]:
    """(line number, row) for each non-blank line; every `required` key must be a non-empty string. Errors name
    file:line."""
    rows = []
    with _require(path).open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            for key in required:
                _check_text(row, key, path, number)
            rows.append((number, row))
    return rows


def _check_text(row: dict, key: str, path: Path, number: int) -> str:
    if key not in row:
        raise ValueError(f"{path}:{number}: missing key {key!r} (keys: {', '.join(sorted(row)) or 'none'})")
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{path}:{number}: {key!r} must be a non-empty string, got {value!r:.60}")
    return value


def _read_csv(path: Path, required: Sequence[str]) -> list[tuple[int, dict]]:
    rows = []
    with _require(path).open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}:1: missing column(s) {missing} (header: {reader.fieldnames})")
        for row in reader:
            number = reader.line_num
            if None in row:
                raise ValueError(f"{path}:{number}: more fields than the header has")
            for key in required:
                if row.get(key) is None:
                    raise ValueError(f"{path}:{number}: missing field {key!r}")
            if not row[required[0]].strip():
                raise ValueError(f"{path}:{number}: {required[0]!r} is empty")
            rows.append((number, row))
    return rows


def _question_suite(suite: str, data_dir: Path, filename: str, kind: str = "harmful", **meta) -> list[EvalItem]:
    path = data_dir / PAPER_TEST / filename
    return [EvalItem(id=f"{suite}:{i}", suite=suite, prompt=row["question"], kind=kind, meta=dict(meta))
            for i, (_, row) in enumerate(read_jsonl(path, ["question"]))]


# ------------------------------------------------------------------------------------------------ harmful
@register_suite("completion_attack", "DeRTa CompletionAttack: attacker-written start of a harmful answer "
                "(\"I will explain ... Step 1:\"); fed raw, without chat template, the model continues it", "asr")
def _completion_attack(data_dir: Path) -> list[EvalItem]:
    # The text is the start of the *assistant's* answer, not a user request: meta["template"] = "none" tells
    # the evaluator to feed `prompt` as raw text. The judge only sees what the model appended.
    return _question_suite("completion_attack", data_dir, "safety_completionattack.jsonl", template="none")


# the paper's harmful-question test files: one `question` per row, fed through the chat template
PAPER_QUESTION_SUITES = {
    "illegal_instructions": ("safety_illegal_instructions_200.jsonl",
                             "200 direct requests for illegal instructions (DeRTa test set)"),
    "jailbreakchat": ("safety_jailbreakchat.jsonl",
                      "200 jailbreakchat.com role-play templates wrapping a harmful request"),
    "codeattack": ("safety_codeattack.jsonl",
                   "CodeAttack: harmful request hidden in a code-completion task (deque words)"),
    "selfcipher": ("safety_selfcipher.jsonl",
                   "SelfCipher: role-play 'Cipher Code' with harmful few-shot demonstrations"),
}
for _name, (_filename, _description) in PAPER_QUESTION_SUITES.items():
    register_suite(_name, _description, "asr")(functools.partial(_question_suite, _name, filename=_filename))


@register_suite("advbench", "AdvBench harmful behaviors (goal as prompt; target 'Sure, here is ...' in meta; "
                "option prefill_target=True prefills the target)", "asr")
def _advbench(data_dir: Path, prefill_target: bool = False) -> list[EvalItem]:
    rows = _read_csv(data_dir / "advbench" / "harmful_behaviors.csv", ["goal", "target"])
    return [EvalItem(id=f"advbench:{i}", suite="advbench", prompt=row["goal"],
                     prefix=row["target"] if prefill_target else "", meta={"target": row["target"]})
            for i, (_, row) in enumerate(rows)]


_MALICIOUS_PREFIX = re.compile(r"\A### Instruction:\n(?P<prompt>.+?)\n\n### Response:\s*\Z", re.S)


@register_suite("prefill_malicious", "DeRTa malicious-tuning rows: instruction + harmful response in "
                "meta['harmful_response'], for prefilling attacks via build_prefill_items", "prefill_asr")
def _prefill_malicious(data_dir: Path) -> list[EvalItem]:
    path = data_dir / "derta-paper" / "train" / "malicious_tuning_data_330.jsonl"
    items = []
    for i, (number, row) in enumerate(read_jsonl(path, ["prefix", "text"])):
        match = _MALICIOUS_PREFIX.match(row["prefix"])
        if not match or not match.group("prompt").strip():
            raise ValueError(f"{path}:{number}: 'prefix' is not '### Instruction:\\n<prompt>\\n\\n### Response:'")
        response = _strip_end_markers(row["text"])
        if not response:
            raise ValueError(f"{path}:{number}: 'text' is empty after removing the end-of-text marker")
        items.append(EvalItem(id=f"prefill_malicious:{i}", suite="prefill_malicious",
                              prompt=match.group("prompt").strip(), meta={"harmful_response": response}))
    return items


def _strip_end_markers(text: str) -> str:
    text = text.strip()
    for marker in END_MARKERS:
        if text.endswith(marker):
            text = text[: -len(marker)].rstrip()
    return text


# ------------------------------------------------------------------------------------------------ over-refusal
@register_suite("xstest", "XSTest: 250 safe prompts that look unsafe (kind 'benign') + 200 unsafe contrasts "
                "(kind 'harmful'); type/focus/note in meta", "refusal_rate")
def _xstest(data_dir: Path) -> list[EvalItem]:
    path = data_dir / "xstest" / "xstest_prompts.csv"
    items = []
    for number, row in _read_csv(path, ["prompt", "id", "type", "label"]):
        label = row["label"].strip()
        if label not in ("safe", "unsafe"):
            raise ValueError(f"{path}:{number}: label must be 'safe' or 'unsafe', got {label!r}")
        items.append(EvalItem(id=f"xstest:{row['id']}", suite="xstest", prompt=row["prompt"],
                              kind="benign" if label == "safe" else "harmful",
                              meta={"label": label, "type": row["type"], "focus": row.get("focus") or "",
                                    "note": row.get("note") or ""}))
    return items


# ------------------------------------------------------------------------------------------------ helpfulness
@register_suite("gsm8k", "500 GSM8K math word problems; reference = number after '####'", "gsm8k_accuracy")
def _gsm8k(data_dir: Path) -> list[EvalItem]:
    path = data_dir / PAPER_TEST / "helpfulness_gsm8k_500.jsonl"
    items = []
    for i, (number, row) in enumerate(read_jsonl(path, ["question", "answer"])):
        if "####" not in row["answer"]:
            raise ValueError(f"{path}:{number}: 'answer' has no '#### <number>' line")
        reference = extract_gsm8k_answer(row["answer"])
        if reference is None:
            raise ValueError(f"{path}:{number}: no number after '####' in 'answer'")
        items.append(EvalItem(id=f"gsm8k:{i}", suite="gsm8k", prompt=row["question"], reference=reference,
                              kind="gsm8k", meta={"solution": row["answer"]}))
    return items


_MMLU_OPTION = re.compile(r"^-\(([A-D])\)\s?(.*)$", re.M)


@register_suite("mmlu", "500 MMLU multiple-choice questions (options A-D in the prompt); reference = letter",
                "mmlu_accuracy")
def _mmlu(data_dir: Path) -> list[EvalItem]:
    path = data_dir / PAPER_TEST / "helpfulness_mmlu_500.jsonl"
    items = []
    for i, (number, row) in enumerate(read_jsonl(path, ["question", "answer"])):
        answer = row["answer"].strip().upper()
        if answer not in ("A", "B", "C", "D"):
            raise ValueError(f"{path}:{number}: 'answer' must be one of A-D, got {row['answer']!r}")
        choices = {letter: text.strip() for letter, text in _MMLU_OPTION.findall(row["question"])}
        if sorted(choices) != ["A", "B", "C", "D"]:
            raise ValueError(f"{path}:{number}: 'question' must list options -(A) .. -(D), found {sorted(choices)}")
        items.append(EvalItem(id=f"mmlu:{i}", suite="mmlu", prompt=row["question"], reference=answer, kind="mmlu",
                              meta={"choices": choices}))
    return items


@register_suite("alpaca_eval", "300 AlpacaEval instructions (no reference; compare outputs)", "open_ended")
def _alpaca_eval(data_dir: Path) -> list[EvalItem]:
    return _question_suite("alpaca_eval", data_dir, "helpfulness_alpaca_eval_300.jsonl", kind="helpful")


# ------------------------------------------------------------------------------------------------ synthetic
def _synthetic_rows(suite: str, path: str | os.PathLike | None, need: str) -> list[tuple[Path, int, dict]]:
    """Rows of a synthetic held-out JSONL file (or of `*<kind>*.jsonl` files in a directory) that have `need`.

    A file that mixes kinds is filtered: a row with a `kind`/`category`/`split` field naming another suite kind
    is skipped, and rows without the `need` key are skipped (a helpful row has no harmful_response)."""
    if path is None:
        raise ValueError(f"suite {suite!r} needs path=<held-out JSONL file or directory> "
                         "(written by the synthetic corpus generator)")
    root = Path(path)
    wanted = suite.removeprefix("synthetic_")
    accepted = ("helpful", "lookalike") if wanted == "benign_prefill" else (wanted,)
    if root.is_dir():
        files = sorted(p for p in root.glob(f"*{wanted}*.jsonl") if p.is_file())
        if not files:
            raise FileNotFoundError(f"{root}: no *{wanted}*.jsonl file for suite {suite!r}")
    else:
        files = [_require(root)]
    rows = []
    for file in files:
        for number, row in read_jsonl(file, []):
            tag = next((str(row[k]) for k in ("kind", "category", "split") if row.get(k)), "")
            if tag in ("helpful", "harmful", "lookalike") and tag not in accepted:
                continue
            if need not in row:
                continue
            _check_text(row, "instruction", file, number)
            _check_text(row, need, file, number)
            rows.append((file, number, row))
    return rows


def _synthetic_id(suite: str, index: int, row: dict) -> str:
    return f"{suite}:{row['id']}" if row.get("id") not in (None, "") else f"{suite}:{index}"


@register_suite("synthetic_helpful", "held-out synthetic helpful rows (instruction/response/answer); "
                "option path=", "exact_answer")
def _synthetic_helpful(data_dir: Path, path: str | None = None) -> list[EvalItem]:
    return [EvalItem(id=_synthetic_id("synthetic_helpful", i, row), suite="synthetic_helpful",
                     prompt=row["instruction"], reference=_answer(row), kind="helpful",
                     meta={"response": row["response"]})
            for i, (_, _, row) in enumerate(_synthetic_rows("synthetic_helpful", path, "response"))]


@register_suite("synthetic_lookalike", "held-out synthetic benign prompts that look harmful (over-refusal); "
                "option path=", "refusal_rate")
def _synthetic_lookalike(data_dir: Path, path: str | None = None) -> list[EvalItem]:
    return [EvalItem(id=_synthetic_id("synthetic_lookalike", i, row), suite="synthetic_lookalike",
                     prompt=row["instruction"], reference=_answer(row), kind="benign",
                     meta={"response": row["response"]})
            for i, (_, _, row) in enumerate(_synthetic_rows("synthetic_lookalike", path, "response"))]


def _synthetic_harmful_items(suite: str, path: str | None) -> list[EvalItem]:
    return [EvalItem(id=_synthetic_id(suite, i, row), suite=suite, prompt=row["instruction"],
                     meta={"harmful_response": row["harmful_response"],
                           "safe_response": row.get("safe_response") or ""})
            for i, (_, _, row) in enumerate(_synthetic_rows("synthetic_harmful", path, "harmful_response"))]


@register_suite("synthetic_harmful", "held-out synthetic harmful rows (instruction/harmful_response/"
                "safe_response); option path=", "asr")
def _synthetic_harmful(data_dir: Path, path: str | None = None) -> list[EvalItem]:
    return _synthetic_harmful_items("synthetic_harmful", path)


@register_suite("synthetic_prefill", "synthetic_harmful rows for prefilling attacks (expand with "
                "build_prefill_items); option path=", "prefill_asr")
def _synthetic_prefill(data_dir: Path, path: str | None = None) -> list[EvalItem]:
    return _synthetic_harmful_items("synthetic_prefill", path)


@register_suite("synthetic_benign_prefill", "held-out synthetic helpful + lookalike rows whose helpful answer is "
                "prefilled (expand with build_prefill_items(response_key='response')): refusals inserted into "
                "helpful answers; option path= (a file, a directory or a list of files)", "benign_prefill")
def _synthetic_benign_prefill(data_dir: Path, path=None) -> list[EvalItem]:
    from itertools import chain, zip_longest

    paths = path if isinstance(path, (list, tuple)) else [path]
    per_file = [[row for _, _, row in _synthetic_rows("synthetic_benign_prefill", p, "response")] for p in paths]
    # interleaved, so that `limit` keeps both helpful and lookalike answers
    rows = [row for row in chain.from_iterable(zip_longest(*per_file)) if row is not None]
    return [EvalItem(id=_synthetic_id("synthetic_benign_prefill", i, row), suite="synthetic_benign_prefill",
                     prompt=row["instruction"], reference=_answer(row), kind="benign",
                     meta={"response": row["response"]})
            for i, row in enumerate(rows)]


def _answer(row: dict) -> str | None:
    answer = row.get("answer")
    return None if answer is None or str(answer).strip() == "" else str(answer).strip()


# ------------------------------------------------------------------------------------------------ answers
_NUMBER = r"(?:(?<![\w)])-)?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_FINAL_PATTERNS = [
    re.compile(r"####\s*(" + _NUMBER + ")"),
    re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}"),
    re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:|=)?\s*(?:of\s+|that\s+|approximately\s+|about\s+)?"
               r"\**\s*(" + _NUMBER + ")", re.I),
]


def _normalize_number(raw: str) -> str | None:
    text = raw.replace("$", "").replace(",", "").replace(" ", "")
    if "/" in text:
        num, den = text.split("/", 1)
        try:
            value = float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            return None
    else:
        try:
            value = float(text)
        except ValueError:
            return None
    if value == int(value):
        return str(int(value))
    return repr(round(value, 6)).rstrip("0").rstrip(".")


def extract_gsm8k_answer(text: str) -> str | None:
    """The final number of a GSM8K gold answer ("#### 770") or model output, normalised ("1,234.50" -> "1234.5",
    "18.00" -> "18", "$5" -> "5"). Priority: "#### N", "\\boxed{N}", the last "the answer is N", the last number.
    None when there is no number."""
    if not text:
        return None
    for pattern in _FINAL_PATTERNS:
        matches = pattern.findall(text)
        if matches:
            return _normalize_number(matches[-1])
    numbers = _NUMBER_RE.findall(text)
    return _normalize_number(numbers[-1]) if numbers else None


_CHOICE_PATTERNS = [
    re.compile(r"(?:answer|choice|option)\s*(?:is|:|would be|=)?\s*(?:option\s+|choice\s+)?[\(\[\*]*"
               r"((?-i:[A-D])(?![A-Za-z'])|[a-d](?=\s*(?:$|[\).:\]\*])))", re.I),
    re.compile(r"\(([A-D])\)"),
    re.compile(r"^\s*\**\s*([A-D])\s*(?:[\).:\]\*]|$)", re.M),
    re.compile(r"(?<![A-Za-z'])([A-D])(?![A-Za-z'])(?=\s*(?:[\).:]|is correct|$))"),
]


def extract_mmlu_choice(text: str) -> str | None:
    """The chosen letter A-D: "The answer is (B)", "Answer: c", "(D) ...", "C. Paris", "B" -> upper-case letter.
    Priority: an explicit "answer/choice/option ..." (last one), a parenthesised letter, a letter opening a line,
    a standalone letter followed by ")", ".", ":" or the end. None when no letter is found."""
    if not text:
        return None
    explicit = _CHOICE_PATTERNS[0].findall(text)
    if explicit:
        return explicit[-1].upper()
    for pattern in _CHOICE_PATTERNS[1:]:
        match = pattern.search(text)
        if match:
            return match.group(1).upper()
    return None


# ------------------------------------------------------------------------------------------------ prefilling
def _whitespace_tokenize(text: str) -> list[str]:
    """Words with their leading whitespace, so "".join() restores the text exactly."""
    return re.findall(r"\s*\S+", text)


def build_prefill_items(items: Iterable[EvalItem], ks: Sequence[int] = (0, 5, 10, 20, 40), tokenizer: Any = None,
                        *, tokenize: Callable[[str], Sequence] | None = None,
                        detokenize: Callable[[Sequence], str] | None = None,
                        skip_short: bool = True, response_key: str = "harmful_response",
                        kind: str = "harmful") -> list[EvalItem]:
    """One item per (item, k): `prefix` = the first k tokens of `meta[response_key]`, `meta["k"] = k`, the
    item's kind `kind` (benign-prefill controls prefill helpful answers: `response_key="response"`).

    Token boundaries come from, in order: `tokenize`/`detokenize` callables (e.g. `str.split` / `" ".join`),
    or a Hugging Face style `tokenizer` (encode without special tokens, decode skipping them), or words with
    their leading whitespace. k = 0 is the plain prompt. With `skip_short`, k >= the response length is skipped
    (prefilling the whole response leaves the model nothing to refuse; `meta["n_tokens"]` records the length).
    Ids are `<id>@k<k>`."""
    if tokenize is None and tokenizer is not None:
        def tokenize(text):
            return tokenizer.encode(text, add_special_tokens=False)
        detokenize = detokenize or (lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True))
    if tokenize is None:
        tokenize, detokenize = _whitespace_tokenize, detokenize or "".join
    if detokenize is None:
        raise ValueError("build_prefill_items: a custom tokenize needs its detokenize")
    if any(k < 0 for k in ks):
        raise ValueError(f"ks must be >= 0, got {list(ks)}")
    out = []
    for item in items:
        response = item.meta.get(response_key)
        if not response:
            raise ValueError(f"{item.id}: meta[{response_key!r}] is missing; load a suite with such responses "
                             "(prefill_malicious, synthetic_harmful, synthetic_prefill; synthetic_benign_prefill "
                             "for 'response')")
        tokens = list(tokenize(response))
        for k in ks:
            if k and skip_short and k >= len(tokens):
                continue
            prefix = detokenize(tokens[:k]) if k else ""
            out.append(replace(item, id=f"{item.id}@k{k}", prefix=prefix, kind=kind,
                               meta={**item.meta, "k": k, "n_tokens": len(tokens), "source_id": item.id}))
    return out
