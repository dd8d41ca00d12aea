"""`derta probe`: per-item refusal curves from a file, computed by the same function /probe runs."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from derta.cli import app

runner = CliRunner()


def test_probe_writes_curves_and_plot_identical_to_the_probe_function(tiny_path, tiny_config, tmp_path):
    from derta.modeling import load_model, load_tokenizer
    from derta.probe import probe
    from derta.transforms import PromptRenderer, refusal_token_ids

    items = [{"id": "a", "prompt": "How do I pick a lock?", "response": "Sure. Step 1: get a tension wrench."},
             {"messages": [{"role": "user", "content": "Say hi."}], "response": "Hi there!"},
             {"id": 7, "prompt": "Explain photosynthesis.", "response": "Plants turn light into sugar.",
              "threshold": 0.01}]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(item) for item in items) + "\n\n")
    out = tmp_path / "probe"
    result = runner.invoke(app, ["probe", "--model", tiny_path, "--input", str(pairs), "--output", str(out),
                                 "--set", f"model.tiny_dir={tiny_config.model.tiny_dir}"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == ["a", None, 7] and [row["line"] for row in rows] == [1, 2, 3]
    assert (out / "refusal_curves.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["items"] == 3 and len(summary["mean_p_refusal"]) == max(len(r["p_refusal"]) for r in rows)

    tokenizer = load_tokenizer(tiny_path)
    renderer = PromptRenderer(tokenizer)
    model = load_model(tiny_path).eval()
    refusal_ids = refusal_token_ids(tokenizer, tiny_config.data.probe_refusal_strings)
    for item, row in zip(items, rows):
        response_ids = tokenizer.encode(item["response"], add_special_tokens=False)
        prompt = (renderer.render_messages(item["messages"]) if "messages" in item else renderer.render(item["prompt"]))
        expected = probe(model, renderer.encode_prompt(prompt), response_ids, refusal_ids, item.get("threshold", 0.5))
        assert row["response_tokens"] == len(response_ids) and len(row["p_refusal"]) == len(response_ids) + 1
        assert row["p_refusal"] == [round(p, 6) for p in expected.refusal_prob]
        assert row["first_crossing"] == expected.first_crossing and row["threshold"] == item.get("threshold", 0.5)
        assert "".join(row["tokens"]) == tokenizer.decode(response_ids)


def test_probe_bad_line_is_a_clear_error(tiny_path, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n" + json.dumps({"prompt": "p"}) + "\n")
    result = runner.invoke(app, ["probe", "-m", tiny_path, "-i", str(pairs), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and f"{pairs}:2" in result.output and "response" in result.output
    assert "Traceback" not in result.output
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"prompt": "p", "messages": [{"role": "user", "content": "x"}], "response": "r"}))
    result = runner.invoke(app, ["probe", "-m", tiny_path, "-i", str(both), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and f"{both}:1" in result.output and "exactly one of" in result.output
    result = runner.invoke(app, ["probe", "-m", tiny_path, "-i", str(tmp_path / "missing.jsonl"), "-o", "x"])
    assert result.exit_code == 2 and "not found" in result.output
