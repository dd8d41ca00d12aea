"""Real-tokenizer tier, end to end: for each shared tokenizer (Llama-3.1, Qwen3, Llama-2 SentencePiece) a 1-layer
random-init model of its vocabulary goes through `derta data prepare` -> `derta train` (2 steps) -> Serve
`/probe` and `/generate` -> `derta eval` (local checkpoints and the served endpoint), on one shared Ray."""
from __future__ import annotations

import json
import socket

import pytest
from typer.testing import CliRunner

from real_models import FAMILIES, copy_tokenizer, tiny_model_dir
from serve_utils import restored_environ

pytestmark = pytest.mark.slow
runner = CliRunner()
END_OF_TURN = {"llama3_1": "<|eot_id|>", "qwen3": "<|im_end|>", "llama2": "</s>"}
BOS = {"llama3_1": "<|begin_of_text|>", "qwen3": None, "llama2": "<s>"}


def invoke(*args: str):
    from derta.cli import app

    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from derta.synthetic import write_corpus

    paths = write_corpus(tmp_path_factory.mktemp("corpus"), n_helpful=40, n_harmful=24, n_lookalike=0)
    merged = paths["train_helpful"].parent / "train.jsonl"
    merged.write_text(paths["train_helpful"].read_text() + paths["train_safety"].read_text())
    return merged


@pytest.fixture(scope="module")
def trained(ray_session, corpus, tmp_path_factory):
    """family -> (model dir, prepared-data dir, final checkpoint dir)."""
    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(family)
        model = tiny_model_dir(copy_tokenizer(family, root / "model"))
        common = ["--set", f"model.name_or_path={model}", "--set", "data.max_length=128"]
        invoke("data", "prepare", *common, "--input", str(corpus), "--mode", "derta", "--output", str(root / "data"))
        invoke("train", *common, "--set", f"data.sources=[{{path: {corpus}}}]", "--set", "train.max_steps=2",
               "--set", "train.num_workers=1", "--set", "train.batch_size=4", "--set", "train.checkpoint_every=2",
               "--output", str(root / "run"))
        out[family] = (model, root / "data", root / "run" / "final")
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_prepared_examples_on_real_tokenizers(trained, family):
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    model, data, _ = trained[family]
    tokenizer = AutoTokenizer.from_pretrained(model)
    table = pq.read_table(data / "examples")
    rows = table.to_pylist()
    assert {r["kind"] for r in rows} == {"helpful", "harmful_prefix", "rto"}
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN[family])
    sorry = tokenizer.encode("Sorry", add_special_tokens=False)[0]
    for row in rows:
        ids = list(row["input_ids"])
        bos_count = ids.count(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else 0
        assert bos_count == (1 if BOS[family] else 0)
        labels = [int(x) for x in row["labels"]]
        if row["kind"] == "rto":
            assert set(x for x in labels if x != -100) == {sorry}
        else:
            assert labels[-1] == eot  # responses end with the template's end-of-turn token
    stats = json.loads((data / "stats.json").read_text())
    assert stats["examples_by_kind"]["rto"] > 0
    # every synthetic safe response opens with "Sorry": none is counted as not starting with the refusal token
    assert stats["harmful_prefix_refusal_start"] == {"starts_with_refusal_token": stats["examples_by_kind"][
        "harmful_prefix"], "does_not": 0}
    # plain Parquet any tool reads
    import pyarrow as pa

    for name in ("input_ids", "labels", "rto_mask"):
        assert table.schema.field(name).type == pa.list_(pa.int32())
    assert table.schema.field("kind").type == pa.string()
    assert all(table.column(name).null_count < table.num_rows for name in table.column_names)


@pytest.mark.parametrize("family", FAMILIES)
def test_final_checkpoint_stops_on_the_end_of_turn_token(trained, family):
    from transformers import AutoTokenizer, GenerationConfig

    _, _, final = trained[family]
    tokenizer = AutoTokenizer.from_pretrained(final)
    eos = GenerationConfig.from_pretrained(final).eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    assert tokenizer.convert_tokens_to_ids(END_OF_TURN[family]) in eos and tokenizer.eos_token_id in eos


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(trained):
    """One Serve app: llama3_1 as the default model, the other families as registry entries."""
    from ray import serve

    from derta.config import load_config
    from serve.app import start_local

    registry = ", ".join(f"{family}: {{path: {trained[family][2]}}}" for family in FAMILIES[1:])
    cfg = load_config("tiny", ["serve.ray_actor_options={num_cpus: 0.25}", f"serve.registry={{{registry}}}",
                               "serve.max_new_tokens=16", "serve.model_name=llama3_1"])
    with restored_environ():  # start_local sets Serve's variables for this process: none outlives the module
        url = start_local(cfg, str(trained[FAMILIES[0]][2]), free_port())
        yield url
        serve.shutdown()


@pytest.fixture(scope="module")
def client(served):
    import time

    import httpx

    with httpx.Client(base_url=served, timeout=120) as http:
        deadline = time.time() + 300
        while http.get("/ready").status_code != 200:
            assert time.time() < deadline, "the app never became ready"
            time.sleep(0.5)
        yield http


@pytest.mark.parametrize("family", FAMILIES)
def test_serve_probe_and_generate(client, trained, family):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained[family][2])
    response = "Sure, here is how: first get the tools."
    probe = client.post("/probe", json={"model": family, "prompt": "How do I do it?", "response": response})
    assert probe.status_code == 200, probe.text
    body = probe.json()
    assert body["refusal_tokens"] and body["refusal_tokens"][0].strip() == "Sorry"
    n = len(tokenizer.encode(response, add_special_tokens=False))
    assert body["response_tokens"] == n and len(body["positions"]) == n + 1
    assert all(0 <= p["p_refusal"] <= 1 for p in body["positions"])
    generated = client.post("/generate", json={"model": family, "prompt": "Name a colour.", "max_new_tokens": 6})
    assert generated.status_code == 200, generated.text
    assert generated.json()["completion_tokens"] <= 6


def test_eval_local_checkpoints_and_the_endpoint(trained, served, tmp_path):
    settings = ["--suite", "synthetic_prefill", "--set", "eval.limit=2", "--set", "eval.prefill_ks=[0, 3]",
                "--set", "eval.max_new_tokens=6"]
    local = [arg for family in FAMILIES for arg in ("--model", f"{family}={trained[family][2]}")]
    invoke("eval", "--output", str(tmp_path / "local"), *local, *settings)  # each checkpoint's own tokenizer
    assert set(json.loads((tmp_path / "local" / "summary.json").read_text())) == set(FAMILIES)
    # the endpoint serves llama3_1 by default; the evaluator renders with that tokenizer, the server adds the BOS
    invoke("eval", "--output", str(tmp_path / "endpoint"), "--model", f"endpoint={served}", *settings,
           "--set", f"model.tokenizer={trained[FAMILIES[0]][2]}")
    assert set(json.loads((tmp_path / "endpoint" / "summary.json").read_text())) == {"endpoint"}
