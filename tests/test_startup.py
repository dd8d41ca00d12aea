"""Start-up: `derta train` as a user runs it (a fresh process that starts its own lean private Ray instance), and
the tokenizer loading that keeps torch out of the Ray Data tokenize workers.

The lean instance (derta.runtime: no dashboard, no placement-group cleaner, no preemption watcher) is only ever
started by a `derta train` process of its own; the rest of the suite shares one full instance (`ray_session`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_train_cli_on_a_lean_private_instance_trains_and_prints_only_our_lines(tiny_config, tmp_path):
    env = dict(os.environ, DERTA_RAY_REUSE="0", DERTA_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.pop("RAY_ADDRESS", None)
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "derta.cli", "train", "--set", f"model.tiny_dir={tiny_config.model.tiny_dir}",
         "--set", "train.max_steps=2", "--set", "train.log_every=1", "--output", str(run)],
        env=env, capture_output=True, text=True, cwd=tmp_path, timeout=1200)
    console = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0, "\n".join(console[-60:])
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (run / "final" / "config.json").exists()
    # our lines, progress lines and the result only: nothing from Ray about its helper actors or the dashboard
    foreign = [line for line in console if line.strip() and not line.startswith(("[derta]", "final model:"))]
    assert not foreign, "\n".join(foreign)


TOKENIZER_DIRS = ("llama3_1", "qwen3", "llama2")


@pytest.mark.parametrize("name", ("tiny",) + TOKENIZER_DIRS)
def test_load_tokenizer_is_what_autotokenizer_loads(name, tiny_path):
    """load_tokenizer skips AutoTokenizer (and its torch import) for plain `tokenizers` directories; the result
    must be the tokenizer AutoTokenizer gives: class, vocabulary, special tokens, encodings, chat template."""
    from transformers import AutoTokenizer

    from derta.modeling import load_tokenizer

    if name == "tiny":
        path = tiny_path
    else:
        from conftest import SHARED

        path = SHARED.parent / "tokenizers" / name
        if not path.is_dir():
            pytest.skip(f"shared tokenizer not found at {path}")
    ours, auto = load_tokenizer(str(path)), AutoTokenizer.from_pretrained(str(path))
    if auto.pad_token_id is None:
        auto.pad_token = auto.eos_token
    assert type(ours) is type(auto)
    assert ours.get_vocab() == auto.get_vocab()
    assert ours.all_special_tokens == auto.all_special_tokens
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (auto.bos_token_id, auto.eos_token_id,
                                                                          auto.pad_token_id)
    texts = ["Sorry, I cannot help with that.", "  leading spaces\nand a newline", "émoji 🙂 and 1234"]
    assert ours(texts)["input_ids"] == auto(texts)["input_ids"]
    assert ours(texts, add_special_tokens=False)["input_ids"] == auto(texts, add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "Knead it."}]
    if auto.chat_template:
        assert ours.apply_chat_template(messages, tokenize=False) == auto.apply_chat_template(messages, tokenize=False)


def test_loading_the_tiny_tokenizer_does_not_import_torch(tiny_path):
    code = ("import sys; from derta.modeling import load_tokenizer; "
            f"load_tokenizer({tiny_path!r}); print('torch' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_trainer_starts_no_helper_actors_derta_does_not_use(ray_session, tiny_config):
    """No DatasetManager (derta passes no datasets) and no placement-group cleaner (the job owns the group); the
    preemption watcher is off only while every train worker has to land on the driver's own node."""
    from ray.train.torch import TorchTrainer

    from derta.runtime import LEAN_ENV, _workers_fit_only_here, trainer_class

    (watcher_env, off), = LEAN_ENV.items()
    before = os.environ.pop(watcher_env, None)
    try:
        train = tiny_config.train  # 2 workers x 1 CPU on this 4-CPU single-node instance
        assert _workers_fit_only_here(train)
        trainer = trainer_class(train)(lambda config: None, train_loop_config={})
        assert isinstance(trainer, TorchTrainer)
        assert os.environ.get(watcher_env) == off
        names = {type(cb).__name__ for cb in trainer._create_default_callbacks()}
        assert "BackendSetupCallback" in names  # the torch process group is still set up
        assert not names & {"DatasetsCallback", "PlacementGroupCleanerCallback"}, names
        # a dataset brings the DatasetsCallback back
        with_data = trainer_class(train)(lambda config: None, datasets={"train": ray_session.data.range(4)})
        assert "DatasetsCallback" in {type(cb).__name__ for cb in with_data._create_default_callbacks()}

        os.environ.pop(watcher_env)
        cpus = int(ray_session.cluster_resources()["CPU"])
        for elsewhere in (train.model_copy(update={"num_workers": cpus + 1}),  # needs another node
                          train.model_copy(update={"placement_strategy": "STRICT_SPREAD"}),
                          train.model_copy(update={"use_gpu": True})):
            assert not _workers_fit_only_here(elsewhere), elsewhere
            trainer_class(elsewhere)
            assert watcher_env not in os.environ
    finally:
        os.environ.pop(watcher_env, None)
        if before is not None:
            os.environ[watcher_env] = before
