"""Row normalisation: every supported row shape, column mapping, and every malformed-row reason."""
import json

from derta.schema import normalize_record

SUFFIXES = ["<|end_of_text|>"]


def test_helpful_safety_chat_rendered_rows():
    assert normalize_record({"instruction": "a", "response": "b"})["kind"] == "helpful"
    safety = normalize_record({"instruction": "a", "harmful_response": "b", "safe_response": "c", "id": 7})
    assert safety["kind"] == "safety" and safety["id"] == "7"
    chat = normalize_record({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    assert chat["kind"] == "chat" and json.loads(chat["messages"])[-1]["content"] == "yo"
    rendered = normalize_record({"prefix": "[INST] x [/INST]", "text": " y<|end_of_text|>", "safe": "true"},
                                strip_suffixes=SUFFIXES)
    assert rendered["kind"] == "rendered" and rendered["target_harmful"] is True and rendered["target_text"] == " y"


def test_harmful_pair_rows_extract_instruction():
    row = normalize_record({"prefix": "### Instruction:\nDo harm.\n\n### Response:", "text": " Sure.<|end_of_text|>"},
                           strip_suffixes=SUFFIXES)
    assert row["kind"] == "safety" and row["instruction"] == "Do harm." and row["harmful_response"] == " Sure."
    assert row["safe_response"] is None


def test_column_mapping():
    row = normalize_record({"question": "q", "bad": "b"}, columns={"instruction": "question", "harmful_response": "bad"})
    assert row["kind"] == "safety" and row["instruction"] == "q"


def test_malformed_rows_name_the_problem():
    assert "expected an object" in normalize_record([1, 2])["error"]
    assert "cannot tell the row kind" in normalize_record({"foo": 1})["error"]
    assert "field 'response': must not be empty" in normalize_record({"instruction": "a", "response": "  "})["error"]
    assert "field 'instruction'" in normalize_record({"instruction": 5, "response": "b"})["error"]
    assert "over max_chars=10" in normalize_record({"instruction": "a", "response": "b" * 11}, max_chars=10)["error"]
    assert "role 'assistant'" in normalize_record({"messages": [{"role": "user", "content": "a"},
                                                                {"role": "user", "content": "b"}]})["error"]
    assert "field 'safe'" in normalize_record({"prefix": "a", "text": "b", "safe": "maybe"})["error"]
