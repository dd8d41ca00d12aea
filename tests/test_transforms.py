"""Exact label masks, RTO targets, k distribution, refusal-token derivation, prompt rendering."""
import json

import numpy as np
import pytest

from derta.transforms import (IGNORE_INDEX, PromptRenderer, RefusalTokenError, examples_for_record,
                              examples_for_records, harmful_prefix_example, helpful_example, refusal_token_id,
                              row_rng, rto_example, sample_prefix_len)

P, H, S, EOS, SORRY = [1, 2, 3], [10, 11, 12, 13], [20, 21], 99, 7


def test_helpful_loss_on_response_and_eos_only():
    ex = helpful_example(P, [5, 6], EOS, max_length=64)
    assert ex.input_ids == [1, 2, 3, 5, 6, 99]
    assert ex.labels == [IGNORE_INDEX] * 3 + [5, 6, 99]
    assert ex.rto_mask == [0] * 6


def test_harmful_prefix_masks_prompt_and_harmful_prefix():
    ex = harmful_prefix_example(P, H, S, k=2, eos_id=EOS, max_length=64)
    assert ex.input_ids == [1, 2, 3, 10, 11, 20, 21, 99]
    assert ex.labels == [IGNORE_INDEX] * 5 + [20, 21, 99]
    assert ex.prefix_len == 2 and ex.num_loss_tokens == 3


def test_harmful_prefix_k0_is_plain_refusal():
    ex = harmful_prefix_example(P, H, S, k=0, eos_id=EOS, max_length=64)
    assert ex.input_ids == [1, 2, 3, 20, 21, 99]


def test_harmful_prefix_truncation_shortens_prefix_first():
    ex = harmful_prefix_example(P, H, S, k=4, eos_id=EOS, max_length=7)
    assert ex.prefix_len == 1  # 3 prompt + 1 harmful + 2 safe + eos = 7
    assert ex.labels[-3:] == [20, 21, 99]


def test_rto_targets_refusal_at_every_harmful_position():
    ex = rto_example(P, H, SORRY, max_length=64)
    # refusal after prompt + harmful[:j] for j = 0..4: the last target follows the whole harmful response
    assert ex.input_ids == [1, 2, 3, 10, 11, 12, 13, SORRY]
    assert ex.labels == [IGNORE_INDEX] * 3 + [SORRY] * 5
    assert ex.rto_mask == [0, 0, 0, 1, 1, 1, 1, 1]


def test_rto_without_the_target_after_the_whole_response():
    # data.rto_after_end=False: refusal after prompt + harmful[:j] for j = 0..3 only; nothing is trained at the
    # position after the last harmful token, where a finished response has its end-of-turn token
    ex = rto_example(P, H, SORRY, max_length=64, after_end=False)
    assert ex.input_ids == P + H
    assert ex.labels == [IGNORE_INDEX] * 3 + [SORRY] * 4
    assert ex.rto_mask == [0, 0, 0, 1, 1, 1, 1]
    assert ex.num_loss_tokens == len(H)


def test_rto_truncated_keeps_mask_aligned():
    ex = rto_example(P, H, SORRY, max_length=5)
    assert len(ex.input_ids) == len(ex.labels) == len(ex.rto_mask) == 5
    assert ex.rto_mask == [0, 0, 0, 1, 1]


def test_prompt_longer_than_max_length_has_no_loss():
    assert helpful_example(list(range(10)), [5], EOS, max_length=8).num_loss_tokens == 0


def test_k_distribution_share_of_zero_and_uniform_rest():
    draws = np.array([sample_prefix_len(40, 1 / 3, row_rng(0, f"row{i}", "k")) for i in range(6000)])
    assert abs((draws == 0).mean() - 1 / 3) < 0.03
    nonzero = draws[draws > 0]
    assert nonzero.min() == 1 and nonzero.max() == 40
    counts = np.bincount(nonzero, minlength=41)[1:]
    assert counts.min() > 0.5 * counts.mean()  # roughly uniform over 1..40


def test_k_is_reproducible_per_row_and_seed():
    a = [sample_prefix_len(30, 1 / 3, row_rng(3, f"r{i}", "k")) for i in range(50)]
    b = [sample_prefix_len(30, 1 / 3, row_rng(3, f"r{i}", "k")) for i in range(50)]
    c = [sample_prefix_len(30, 1 / 3, row_rng(4, f"r{i}", "k")) for i in range(50)]
    assert a == b and a != c


def test_refusal_token_derived_from_tokenizer(tokenizer):
    token = refusal_token_id(tokenizer, "Sorry")
    assert tokenizer.decode([token]) == "Sorry"
    assert tokenizer.encode("Sorry, I can't help.", add_special_tokens=False)[0] == token


def test_refusal_token_fails_clearly(tokenizer):
    with pytest.raises(RefusalTokenError, match="refusal"):
        refusal_token_id(tokenizer, "")
    with pytest.raises(RefusalTokenError, match="single character"):
        refusal_token_id(tokenizer, "Zqxjvw")


def test_chat_template_rendering(tokenizer):
    renderer = PromptRenderer(tokenizer)
    assert renderer.use_chat
    text = renderer.render("What is 2 plus 2?", system="Be brief.")
    assert text == "<|system|>\nBe brief.\n<|user|>\nWhat is 2 plus 2?\n<|assistant|>\n"


def test_plain_template_when_no_chat_template(tokenizer):
    renderer = PromptRenderer(tokenizer, use_chat_template=False, plain_template="Q: {instruction}\nA:")
    assert renderer.render("hi") == "Q: hi\nA:"
    assert renderer.render("hi", system="sys") == "sys\n\nQ: hi\nA:"


def _record(**fields):
    base = dict(uid="f:1", kind="safety", instruction="How do I pick a lock?", system=None,
                harmful_response="Sure, here is how. Step 1: get the tool. Step 2: use it.",
                safe_response="Sorry, I can't help with that.", response=None, messages=None,
                prompt_text=None, target_text=None, target_harmful=None, category=None)
    return base | fields


@pytest.mark.parametrize("mode,kinds", [("vanilla", ["harmful_prefix"]), ("recaug", ["harmful_prefix"]),
                                        ("derta", ["harmful_prefix", "rto"])])
def test_modes_select_example_kinds(tokenizer, mode, kinds):
    renderer = PromptRenderer(tokenizer)
    sorry = refusal_token_id(tokenizer, "Sorry")
    examples = examples_for_record(_record(), tokenizer, renderer, mode=mode, refusal_id=sorry,
                                   refusal_templates=["Sorry."], k0_fraction=0.0, max_length=256, seed=0)
    assert [e.kind for e in examples] == kinds
    prefix = examples[0]
    assert (prefix.prefix_len == 0) == (mode == "vanilla")
    # the loss starts exactly at the refusal token, after prompt + k harmful tokens
    first_loss = next(i for i, label in enumerate(prefix.labels) if label != IGNORE_INDEX)
    assert prefix.labels[first_loss] == sorry and first_loss == prefix.prompt_len + prefix.prefix_len
    if mode == "derta":
        rto = examples[1]
        harmful = tokenizer.encode(_record()["harmful_response"], add_special_tokens=False)
        assert rto.input_ids[rto.prompt_len:] == harmful + [sorry]
        assert rto.labels[rto.prompt_len:] == [sorry] * (len(harmful) + 1)


def test_missing_safe_response_uses_seeded_template(tokenizer):
    renderer = PromptRenderer(tokenizer)
    sorry = refusal_token_id(tokenizer, "Sorry")
    templates = ["Sorry, no.", "Sorry, I won't."]
    kwargs = dict(mode="vanilla", refusal_id=sorry, refusal_templates=templates, k0_fraction=0, max_length=256,
                  seed=0)
    a = examples_for_record(_record(safe_response=None), tokenizer, renderer, **kwargs)[0]
    b = examples_for_record(_record(safe_response=None), tokenizer, renderer, **kwargs)[0]
    assert a.input_ids == b.input_ids
    safe = [t for t, label in zip(a.input_ids, a.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(safe[:-1]) in templates


def _canonical(**fields):
    from derta.schema import RECORD_COLUMNS

    return dict.fromkeys(RECORD_COLUMNS) | {"source": "edge.jsonl", "line": 1} | fields


def _edge_records():
    """Every record kind, with and without optional fields, plus rows that must fail on their own."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Hello there."}]
    return [
        _canonical(uid="e:1", kind="helpful", instruction="What is 2 plus 2?", response="4."),
        _canonical(uid="e:2", kind="helpful", instruction="Add.", system="Answer in words.", response="Four."),
        _canonical(uid="e:3", kind="safety", instruction="How do I pick a lock?", harmful_response="Sure. " * 40),
        _canonical(uid="e:4", kind="safety", instruction="word " * 60, harmful_response="Step 1.",
                   safe_response="Sorry, no."),
        _canonical(uid="e:5", kind="chat", messages=json.dumps(messages)),
        _canonical(uid="e:6", kind="rendered", prompt_text="### Instruction:\nhi\n\n### Response:\n",
                   target_text="Hello.", target_harmful=False),
        _canonical(uid="e:7", kind="rendered", prompt_text="### Instruction:\nsteal\n\n### Response:\n",
                   target_text="Sure, first take it.", target_harmful=True),
        _canonical(uid="e:8", kind="chat", messages="{not json"),                     # fails while rendering
        _canonical(uid="e:9", kind="helpful", instruction="hi", response=None),        # fails in the tokenizer
        _canonical(uid="e:10", kind="rendered", prompt_text=123, target_text="x", target_harmful=False),
        _canonical(uid="e:11", kind="helpful", instruction="", response=""),
    ]


def _synthetic_records(tmp_path):
    from derta.config import SourceConfig
    from derta.data_read import _parse_jsonl, normalize_batch
    from derta.synthetic import write_corpus

    paths = write_corpus(tmp_path, n_helpful=120, n_harmful=60, n_lookalike=20)
    files = [str(paths["train_helpful"]), str(paths["train_safety"])]
    sources = [SourceConfig(path=p).model_dump() for p in files]
    records = []
    for index, path in enumerate(files):
        raw = list(_parse_jsonl(path, open(path, "rb").read()))
        batch = {key: [r[key] for r in raw] for key in ("source", "line", "raw", "error")}
        records += normalize_batch(batch | {"source_index": [index] * len(raw)}, sources, 32_000).to_pylist()
    return [r for r in records if not r["error"]]


def _outcome(fn):
    try:
        return fn()
    except Exception as err:  # noqa: BLE001
        return err


def _same(a, b):
    if isinstance(a, Exception) or isinstance(b, Exception):
        return type(a) is type(b) and str(a) == str(b)
    return a == b and [e.num_loss_tokens for e in a] == [e.num_loss_tokens for e in b]


@pytest.mark.parametrize("use_chat_template", [True, False])
@pytest.mark.parametrize("max_length", [256, 24])
def test_batched_examples_equal_per_row_examples(tokenizer, tmp_path, use_chat_template, max_length):
    records = _synthetic_records(tmp_path) + _edge_records()
    renderer = PromptRenderer(tokenizer, use_chat_template=use_chat_template)
    kwargs = dict(mode="derta", refusal_id=refusal_token_id(tokenizer, "Sorry"),
                  refusal_templates=["Sorry, no.", "Sorry, I won't."], k0_fraction=1 / 3, max_length=max_length,
                  seed=0)
    batched = examples_for_records(records, tokenizer, renderer, **kwargs)
    per_row = [_outcome(lambda r=r: examples_for_record(r, tokenizer, renderer, **kwargs)) for r in records]
    assert len(batched) == len(records)
    mismatches = [r["uid"] for r, a, b in zip(records, batched, per_row) if not _same(a, b)]
    assert not mismatches
    errors = {r["uid"]: type(b).__name__ for r, b in zip(records, batched) if isinstance(b, Exception)}
    assert errors == {"e:8": "JSONDecodeError", "e:9": "ValueError", "e:10": "ValueError"}
    assert sum(len(b) for b in batched if not isinstance(b, Exception)) > len(records)
    if max_length == 24:  # truncation kept the masks aligned and left some examples without loss tokens
        examples = [e for b in batched if not isinstance(b, Exception) for e in b]
        assert all(len(e.input_ids) == len(e.labels) == len(e.rto_mask) <= 24 for e in examples)
        assert any(e.num_loss_tokens == 0 for e in examples)


def test_word_prefix_unit_cuts_whole_words_and_joins_with_a_space(tokenizer):
    """data.prefix_unit=word: the reference's cut (k in 1..words-2 words, k = 0 for ~k0_fraction of rows), and the
    refusal follows the prefix after a space, never glued to a split word."""
    from derta.transforms import word_prefix

    harmful = "First, get the tools from the shed and then start."
    words = harmful.split(" ")
    cuts = [word_prefix(harmful, 1 / 3, row_rng(0, f"r{i}", "k")) for i in range(3000)]
    assert abs(sum(c == "" for c in cuts) / len(cuts) - 1 / 3) < 0.03
    lengths = {len(c.split(" ")) for c in cuts if c}
    assert lengths == set(range(1, len(words) - 1))
    assert all(harmful.startswith(c) for c in cuts)
    assert word_prefix("Two words", 0.0, row_rng(0, "x", "k")) == ""

    renderer = PromptRenderer(tokenizer)
    record = {"kind": "safety", "uid": "w1", "instruction": "How?", "harmful_response": harmful,
              "safe_response": "Sorry, I can't help."}
    for seed in range(12):
        prefix_row, rto = examples_for_record(record, tokenizer, renderer, mode="derta", refusal_id=5,
                                              refusal_templates=["Sorry."], k0_fraction=0.0, max_length=256,
                                              seed=seed, prefix_unit="word")
        text = tokenizer.decode(prefix_row.input_ids[prefix_row.prompt_len:])
        cut = word_prefix(harmful, 0.0, row_rng(seed, "w1", "k"))
        assert text.startswith(cut + " Sorry, I can't help."), text
        assert rto.input_ids[rto.prompt_len:-1] == tokenizer.encode(harmful, add_special_tokens=False)
    # vanilla has no prefix: both units give the same rows (so `derta experiment` reuses vanilla and the base)
    vanilla = [examples_for_record(record, tokenizer, renderer, mode="vanilla", refusal_id=5,
                                   refusal_templates=["Sorry."], k0_fraction=0.0, max_length=256, seed=0,
                                   prefix_unit=unit) for unit in ("word", "token")]
    assert vanilla[0] == vanilla[1] and vanilla[0][0].prefix_len == 0


def test_the_data_pipeline_honours_prefix_unit(tiny_path):
    """derta.data.Tokenize (what `derta data prepare` / training run) cuts on words when data.prefix_unit=word (it
    used to drop the setting and always cut on tokens)."""
    from derta.config import DataConfig
    from derta.data import Tokenize
    from derta.transforms import word_prefix

    harmful = "First, get the tools from the shed and then start."
    record = {"uid": "w1", "kind": "safety", "instruction": "How?", "harmful_response": harmful,
              "safe_response": "Sorry, I can't help."}
    for unit in ("word", "token"):
        data = DataConfig(prefix_unit=unit, k0_fraction=0.0).model_dump(mode="json")
        tokenize = Tokenize(str(tiny_path), data, "derta")
        prefix_row = tokenize._examples([record])[0][0]
        text = tokenize.tokenizer.decode(prefix_row.input_ids[prefix_row.prompt_len:])
        cut = word_prefix(harmful, 0.0, row_rng(0, "w1", "k"))
        assert text.startswith(cut + " Sorry, I can't help.") == (unit == "word"), (unit, text)


def test_row_draws_do_not_depend_on_where_the_corpus_lives():
    from derta.transforms import unit_hash

    for uid in ("train.jsonl:7", "s3://bucket/x/train.jsonl:7"):
        assert row_rng(0, "/tmp/run-a/_work/train.jsonl:7", "k").random() == row_rng(0, uid, "k").random()
        assert unit_hash(0, "/data/a/train.jsonl:7", "mix") == unit_hash(0, uid, "mix")
    assert row_rng(0, "/a/train.jsonl:7", "k").random() != row_rng(0, "/a/train.jsonl:8", "k").random()


def test_the_data_pipeline_honours_rto_after_end(tiny_path):
    """data.rto_after_end reaches derta.data.Tokenize: with false, the RTO row ends at the last harmful token and
    has one target fewer (none after the whole response)."""
    from derta.config import DataConfig
    from derta.data import Tokenize
    from derta.transforms import RTO

    record = {"uid": "r1", "kind": "safety", "instruction": "How?", "harmful_response": "Step 1: get the tools.",
              "safe_response": "Sorry, I can't help."}
    rto = {}
    for after_end in (True, False):
        data = DataConfig(rto_after_end=after_end).model_dump(mode="json")
        tokenize = Tokenize(str(tiny_path), data, "derta")
        [row] = [ex for ex in tokenize._examples([record])[0] if ex.kind == RTO]
        harmful = tokenize.tokenizer.encode(record["harmful_response"], add_special_tokens=False)
        assert row.input_ids[row.prompt_len:][:len(harmful)] == harmful
        rto[after_end] = row
    assert rto[True].num_loss_tokens == len(harmful) + 1 and rto[False].num_loss_tokens == len(harmful)
    assert rto[False].input_ids == rto[True].input_ids[:-1]


def test_rto_and_prefix_rows_use_the_mid_refusal_token_after_a_non_empty_prefix():
    MID = 77
    ex = rto_example(P, H, SORRY, max_length=64, mid_refusal_id=MID)
    assert ex.labels == [IGNORE_INDEX] * 3 + [SORRY] + [MID] * 4  # j = 0 starts the response, j >= 1 continues it
    safe_mid = [MID, 21]
    assert harmful_prefix_example(P, H, S, k=2, eos_id=EOS, max_length=64, safe_mid=safe_mid).labels[-3:] == [MID, 21, EOS]
    assert harmful_prefix_example(P, H, S, k=0, eos_id=EOS, max_length=64, safe_mid=safe_mid).labels[-3:] == S + [EOS]


def test_the_data_pipeline_honours_mid_refusal_space(tmp_path):
    """data.mid_refusal_space with a tiny tokenizer that has " Sorry" (model.tiny.mid_refusal_token): RTO targets
    after a non-empty prefix are " Sorry" and token-cut refusals after k > 0 tokens read "<prefix> Sorry, ..."; a
    tokenizer without that token is refused with a message naming the settings."""
    from derta.config import DataConfig
    from derta.data import Tokenize
    from derta.modeling import train_tiny_tokenizer
    from derta.synthetic import generate_corpus, tokenizer_training_texts

    texts = list(tokenizer_training_texts(generate_corpus(300, 60, 60)))
    for mid in (True, False):
        train_tiny_tokenizer(texts, 600, "Sorry", mid_refusal_token=mid).save_pretrained(tmp_path / str(mid))
    harmful = "Sure, here is how. Step 1: get the tools from the shed."
    records = [{"uid": f"m{i}", "kind": "safety", "instruction": "How?", "harmful_response": harmful,
                "safe_response": "Sorry, I can't help."} for i in range(12)]
    data = DataConfig(mid_refusal_space=True, k0_fraction=0.0).model_dump(mode="json")
    tokenize = Tokenize(str(tmp_path / "True"), data, "derta")
    sorry, mid = tokenize.refusal_id, tokenize.tokenizer.convert_tokens_to_ids(" Sorry")
    assert tokenize.mid_refusal_id == mid != sorry
    for prefix_row, rto_row in tokenize._examples(records):
        targets = [t for t in rto_row.labels if t != IGNORE_INDEX]
        assert targets[0] == sorry and set(targets[1:]) == {mid}
        text = tokenize.tokenizer.decode(prefix_row.input_ids[prefix_row.prompt_len:])
        assert prefix_row.prefix_len > 0 and text.endswith(" Sorry, I can't help.<|eos|>"), text
        assert "Sorry" not in text[:-len(" Sorry, I can't help.<|eos|>")]
    with pytest.raises(Exception, match="model.tiny.mid_refusal_token"):
        Tokenize(str(tmp_path / "False"), data, "derta")


def test_the_data_pipeline_honours_safe_sentences(tiny_path):
    """data.safe_sentences reaches derta.data.Tokenize: every arm's refusal row keeps the first N sentences of the
    record's refusal and ends in EOS right after them; null keeps the whole refusal."""
    from derta.config import DataConfig
    from derta.data import Tokenize
    from derta.transforms import HARMFUL_PREFIX, first_sentences

    safe = "Sorry, I can't help with that. It could hurt people. If you want, I can help with something else."
    assert first_sentences(safe, 2) == "Sorry, I can't help with that. It could hurt people."
    assert first_sentences(safe, None) == first_sentences(safe, 9) == safe
    record = {"uid": "s1", "kind": "safety", "instruction": "How?", "harmful_response": "Step 1: get the tools.",
              "safe_response": safe}
    for mode in ("vanilla", "recaug", "derta"):
        for n, expected in ((1, "Sorry, I can't help with that."), (None, safe)):
            data = DataConfig(safe_sentences=n, k0_fraction=1.0).model_dump(mode="json")
            tokenize = Tokenize(str(tiny_path), data, mode)
            [row] = [ex for ex in tokenize._examples([record])[0] if ex.kind == HARMFUL_PREFIX]
            text = tokenize.tokenizer.decode(row.input_ids[row.prompt_len:])
            assert text == expected + "<|eos|>", (mode, n, text)
