import json
import re
import time

import pytest

from derta.config import SyntheticConfig
from derta.synthetic import (ANSWER_PREFIX, HARM_CATEGORIES, REFUSAL_STRING, SPLITS, TASKLESS_OPENERS, extract_answer,
                             format_answer, generate_corpus, is_heldout_instruction, taskless_opener_response,
                             tokenizer_training_texts, write_corpus)

HELPFUL_KEYS = {"id", "instruction", "response", "category", "answer"}
SAFETY_KEYS = {"id", "instruction", "harmful_response", "safe_response", "category"}
REFUSAL_WORDS = re.compile(r"\b(sorry|cannot|can't|won't|unable|refuse|apolog\w*|decline|not able)\b", re.I)
TRAIN_SPLITS = ("train_helpful", "train_safety")
HELDOUT_SPLITS = ("heldout_helpful", "heldout_safety", "heldout_lookalike")


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus()


def test_deterministic():
    assert generate_corpus(200, 80, 40, seed=3) == generate_corpus(200, 80, 40, seed=3)


def test_seeds_differ():
    a, b = generate_corpus(200, 80, 40, seed=0), generate_corpus(200, 80, 40, seed=1)
    for split in SPLITS:
        assert [r["instruction"] for r in a[split]] != [r["instruction"] for r in b[split]]


def test_default_split_sizes(corpus):
    sizes = {split: len(rows) for split, rows in corpus.items()}
    assert sizes == {"train_helpful": 2550 + 255, "train_safety": 680, "heldout_helpful": 450, "heldout_safety": 120,
                     "heldout_lookalike": 45}


@pytest.mark.parametrize("n_helpful,n_harmful,n_lookalike,fraction", [
    (0, 0, 0, 0.15), (1, 1, 1, 0.15), (7, 3, 2, 0.5), (100, 50, 20, 0.0), (100, 50, 20, 1.0), (1000, 13, 999, 0.3)])
def test_any_size(n_helpful, n_harmful, n_lookalike, fraction):
    corpus = generate_corpus(n_helpful, n_harmful, n_lookalike, heldout_fraction=fraction)
    assert set(corpus) == set(SPLITS)
    h = lambda n: int(n * fraction + 0.5)  # noqa: E731
    assert len(corpus["heldout_helpful"]) == h(n_helpful)
    assert len(corpus["heldout_safety"]) == h(n_harmful)
    assert len(corpus["heldout_lookalike"]) == h(n_lookalike)
    assert len(corpus["train_safety"]) == n_harmful - h(n_harmful)
    assert len(corpus["train_helpful"]) == n_helpful - h(n_helpful) + n_lookalike - h(n_lookalike)


def test_bad_arguments():
    with pytest.raises(ValueError):
        generate_corpus(n_helpful=-1)
    with pytest.raises(ValueError):
        generate_corpus(heldout_fraction=1.5)


def test_schema_and_ids(corpus):
    ids = []
    for split, rows in corpus.items():
        keys = SAFETY_KEYS if "safety" in split else HELPFUL_KEYS
        for row in rows:
            assert set(row) == keys
            assert all(isinstance(v, str) and v.strip() for v in row.values())
            ids.append(row["id"])
    assert len(ids) == len(set(ids))


def test_safe_responses_start_with_refusal(corpus):
    for split in ("train_safety", "heldout_safety"):
        for row in corpus[split]:
            safe = row["safe_response"]
            assert safe.startswith(REFUSAL_STRING) and safe[len(REFUSAL_STRING)] in ", "
            assert 15 <= len(safe.split()) <= 35


def test_harmful_responses_comply_in_steps(corpus):
    for split in ("train_safety", "heldout_safety"):
        for row in corpus[split]:
            harmful = row["harmful_response"]
            assert len(re.findall(r"\bStep \d+:", harmful)) >= 4
            assert not REFUSAL_WORDS.search(harmful), harmful
            assert "[" in harmful  # placeholder content only
            assert 40 <= len(harmful.split()) <= 90


def test_helpful_responses_never_refuse(corpus):
    for split in ("train_helpful", "heldout_helpful", "heldout_lookalike"):
        for row in corpus[split]:
            assert not row["response"].startswith(REFUSAL_STRING)
            assert not REFUSAL_WORDS.search(row["response"]), row["response"]


def test_answer_convention(corpus):
    for split in ("train_helpful", "heldout_helpful", "heldout_lookalike"):
        for row in corpus[split]:
            assert row["response"].endswith(format_answer(row["answer"]))
            assert "." not in row["answer"] and "\n" not in row["answer"]
            assert extract_answer(row["response"]) == row["answer"]


def test_extract_answer_edge_cases():
    assert extract_answer("5 plus 6 is 11. The answer is 11.") == "11"
    assert extract_answer("The answer is 11. The answer is 12.") == "11"  # first answer wins
    assert extract_answer("The answer is 7, 19, 42") == "7, 19, 42"      # truncated generation
    assert extract_answer("The answer is red\nmore text") == "red"
    assert extract_answer("Sorry, I can't help with that.") is None
    assert extract_answer(ANSWER_PREFIX + ".") is None


def _operands(instruction: str) -> tuple[int, int]:
    a, b = map(int, re.findall(r"\d+", instruction))
    return a, b


def test_arithmetic_answers_are_correct(corpus):
    checked = 0
    for row in corpus["train_helpful"] + corpus["heldout_helpful"]:
        if row["category"] != "arithmetic":
            continue
        a, b = _operands(row["instruction"])
        text = row["instruction"]
        if re.search(r"plus|\+|sum|add", text, re.I):
            expected = a + b
        elif re.search(r"minus|-|take away", text):
            expected = a - b
        elif "Subtract" in text:
            expected = b - a
        else:
            expected = a * b
        assert int(extract_answer(row["response"])) == expected, row
        checked += 1
    assert checked > 500


def test_sorting_and_string_answers_are_correct(corpus):
    for row in corpus["train_helpful"] + corpus["heldout_helpful"]:
        text, answer = row["instruction"], row["answer"]
        if row["category"] == "sorting":
            numbers = sorted(map(int, re.findall(r"\d+", text)), reverse=bool(re.search("descending|largest to|highest to", text)))
            assert answer == ", ".join(map(str, numbers))
        elif row["category"] == "string" and "backwards" in text:
            word = re.search(r"What is (\w+) spelled backwards", text).group(1)
            assert answer == word[::-1]


def test_no_train_heldout_overlap(corpus):
    train = {r["instruction"] for split in TRAIN_SPLITS for r in corpus[split]}
    for split in HELDOUT_SPLITS:
        heldout = [r["instruction"] for r in corpus[split]]
        assert not train & set(heldout)
        assert len(set(heldout)) == len(heldout)  # unique while the space allows
        assert all(is_heldout_instruction(i) for i in heldout)
    assert not any(is_heldout_instruction(i) for i in train)


def test_no_overlap_when_the_space_is_exhausted():
    corpus = generate_corpus(n_helpful=0, n_harmful=0, n_lookalike=8000, heldout_fraction=0.5)
    train = {r["instruction"] for r in corpus["train_helpful"]}
    assert not train & {r["instruction"] for r in corpus["heldout_lookalike"]}


def test_category_coverage(corpus):
    assert len(HARM_CATEGORIES) >= 6
    for split in ("train_safety", "heldout_safety"):
        assert {r["category"] for r in corpus[split]} == set(HARM_CATEGORIES)
    assert {r["category"] for r in corpus["train_helpful"]} == {"arithmetic", "string", "lookup", "sorting", "lookalike"}
    assert {r["category"] for r in corpus["heldout_helpful"]} == {"arithmetic", "string", "lookup", "sorting"}
    assert {r["category"] for r in corpus["heldout_lookalike"]} == {"lookalike"}


def test_lookalikes_share_words_with_harmful_prompts(corpus):
    harmful_words = {w.lower() for r in corpus["train_safety"] for w in re.findall(r"[a-zA-Z]+", r["instruction"])}
    for word in ("kill", "shoot", "beat", "hack", "steal", "crack", "attack", "break", "bomb"):
        assert any(word in r["instruction"].lower() for r in corpus["train_helpful"] if r["category"] == "lookalike")
    assert {"beat", "hack", "steal", "break", "bomb"} <= harmful_words


def test_modest_vocabulary(corpus):
    words = {w for text in tokenizer_training_texts(corpus) for w in re.findall(r"[A-Za-z]+", text)}
    assert 300 <= len(words) <= 1500


def test_tokenizer_training_texts_covers_every_text(corpus):
    texts = list(tokenizer_training_texts(corpus))
    n_rows = sum(len(rows) for rows in corpus.values())
    n_safety = len(corpus["train_safety"]) + len(corpus["heldout_safety"])
    assert len(texts) == 2 * n_rows + n_safety
    assert all(isinstance(t, str) and t for t in texts)


def test_refusal_string_is_one_bpe_token(corpus):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(tokenizer_training_texts(corpus), trainer)
    assert tok.encode(REFUSAL_STRING).tokens == [REFUSAL_STRING]


def test_write_corpus(tmp_path):
    paths = write_corpus(tmp_path / "data", n_helpful=50, n_harmful=20, n_lookalike=10, seed=5)
    assert set(paths) == set(SPLITS)
    expected = generate_corpus(n_helpful=50, n_harmful=20, n_lookalike=10, seed=5)
    for split, path in paths.items():
        assert path.name == f"{split}.jsonl" and path.exists()
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert rows == expected[split]


def test_fast():
    start = time.process_time()  # CPU time of this process: other processes' load on the machine does not count
    corpus = generate_corpus(n_helpful=8000, n_harmful=1500, n_lookalike=500)
    assert sum(len(rows) for rows in corpus.values()) == 10_000
    assert time.process_time() - start < 2.0  # ~0.2 s of CPU


def test_steps_style_rewrites_only_helpful_responses_into_multi_step_answers():
    """helpful_style="steps": the same rows, every helpful / lookalike response an opener + "Step 1..3" + the same
    final answer sentence (so EOS follows the answer, not a first sentence); safety rows unchanged."""
    short, steps = generate_corpus(300, 60, 60, seed=2), generate_corpus(300, 60, 60, seed=2, helpful_style="steps")
    assert generate_corpus(300, 60, 60, seed=2, helpful_style="short") == short
    for split in SPLITS:
        for a, b in zip(short[split], steps[split], strict=True):
            assert {k: v for k, v in a.items() if k != "response"} == {k: v for k, v in b.items() if k != "response"}
            if "response" not in a:
                continue
            assert re.search(r"Step 1: .+ Step 2: .+ Step 3: ", b["response"]), b["response"]
            assert b["response"].endswith(format_answer(b["answer"])) and extract_answer(b["response"]) == b["answer"]
            assert a["response"][: -len(format_answer(a["answer"]))].strip() in b["response"]
            assert b["response"].count(ANSWER_PREFIX) == 1 and not REFUSAL_WORDS.search(b["response"])
    with pytest.raises(ValueError, match="helpful_style"):
        generate_corpus(10, 2, 2, helpful_style="long")


def test_short_safe_style_keeps_opener_and_reason_only():
    full, short = generate_corpus(100, 80, 20, seed=1), generate_corpus(100, 80, 20, seed=1, safe_style="short")
    for split in ("train_safety", "heldout_safety"):
        for a, b in zip(full[split], short[split], strict=True):
            assert {k: v for k, v in a.items() if k != "safe_response"} == {k: v for k, v in b.items()
                                                                           if k != "safe_response"}
            sentences = re.split(r"(?<=[.!?]) ", a["safe_response"])
            assert b["safe_response"] == " ".join(sentences[:2]) and b["safe_response"].startswith(REFUSAL_STRING)
            assert len(re.split(r"(?<=[.!?]) ", b["safe_response"])) == 2 and b["safe_response"][-1] in ".!?"
    assert short["train_helpful"] == full["train_helpful"]
    with pytest.raises(ValueError, match="safe_style"):
        generate_corpus(10, 2, 2, safe_style="tiny")


def test_taskless_opener_style_drops_only_the_restated_task():
    full = generate_corpus(100, 80, 20, seed=1)
    taskless = generate_corpus(100, 80, 20, seed=1, harmful_style="taskless_opener")
    for split in ("train_safety", "heldout_safety"):
        for a, b in zip(full[split], taskless[split], strict=True):
            assert {k: v for k, v in a.items() if k != "harmful_response"} == {k: v for k, v in b.items()
                                                                              if k != "harmful_response"}
            opener, steps = b["harmful_response"].split(" Step 1:", 1)
            assert a["harmful_response"].endswith(" Step 1:" + steps)  # steps and closing unchanged
            assert opener in TASKLESS_OPENERS.values() and len(opener.split()) <= 6
            assert a["harmful_response"].split(" Step 1:", 1)[0] not in TASKLESS_OPENERS.values()
    assert taskless["train_helpful"] == full["train_helpful"]
    assert SyntheticConfig().cache_key() == SyntheticConfig(harmful_style="full").cache_key()
    assert SyntheticConfig(harmful_style="taskless_opener").cache_key()["harmful_style"] == "taskless_opener"
    with pytest.raises(ValueError, match="harmful_style"):
        generate_corpus(10, 2, 2, harmful_style="terse")
    with pytest.raises(ValueError, match="no known opener"):
        taskless_opener_response("Here you go: do it.")
