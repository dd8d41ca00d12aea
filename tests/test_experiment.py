"""The toy experiment pipeline at a tiny scale: base pre-training, three fine-tunes with identical steps, the
held-out evaluation and the report. Sizes are far too small for the paper's effect; only structure is checked."""
from __future__ import annotations

import json

import pytest

from derta.experiment import ARMS, EXPERIMENT_SUITES, run_experiment, seeded

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]
KS = [0, 5]


@pytest.fixture(scope="module")
def experiment(tiny_config, tmp_path_factory):
    from derta.config import load_config

    cfg = load_config("experiment", [
        f"model.tiny_dir={tiny_config.model.tiny_dir}",
        "data.synthetic={n_helpful: 200, n_harmful: 60, n_lookalike: 20, seed: 0}", "data.max_length=192",
        "experiment.base_epochs=1", "experiment.finetune_steps=3", "train.batch_size=8", "train.log_every=1",
        "eval.limit=3", "eval.max_new_tokens=8", "eval.concurrency=1", f"eval.prefill_ks={KS}",
        "experiment.seeds=1", "experiment.first_seed=4"])
    output = tmp_path_factory.mktemp("experiment")
    return cfg, output, run_experiment(cfg, output)


def test_summary_has_every_model_and_suite(experiment):
    _, output, summary = experiment
    assert json.loads((output / "summary.json").read_text()) == summary
    assert list(summary) == ["base", *ARMS]
    for metrics in summary.values():
        assert list(metrics) == EXPERIMENT_SUITES
        for key in ("asr_by_prefix", "refusal_by_prefix", "degenerate_by_prefix"):
            assert list(metrics["synthetic_prefill"][key]) == [str(k) for k in KS]
        assert "refusal_rate" in metrics["synthetic_benign_prefill"]
        assert {"asr", "refusal_rate"} <= set(metrics["synthetic_harmful"])
        assert "accuracy" in metrics["synthetic_helpful"]
        assert "over_refusal_rate" in metrics["synthetic_lookalike"]


def test_training_happened_with_identical_fine_tune_steps(experiment):
    cfg, output, _ = experiment
    record = json.loads((output / "experiment.json").read_text())
    assert record["seeds"] == [4] and record["heldout_split"] == "test"
    runs = record["per_seed"]["4"]["runs"]
    run_dirs = {"base": output / "base" / "run", **{arm: output / "seeds" / "seed-4" / "runs" / arm for arm in ARMS}}
    assert runs["base"]["examples_by_kind"] == {"helpful": runs["base"]["rows"]}
    assert {runs[arm]["steps"] for arm in ARMS} == {3}
    assert "rto" in runs["derta"]["examples_by_kind"] and "rto" not in runs["vanilla"]["examples_by_kind"]
    for name in ["base", *ARMS]:
        metrics = [json.loads(line) for line in (run_dirs[name] / "metrics.jsonl").read_text().splitlines()]
        assert metrics[-1]["step"] == metrics[-1]["total_steps"] == runs[name]["steps"]
        assert (run_dirs[name] / "final" / "config.json").exists()
    first = json.loads((run_dirs["vanilla"] / "metrics.jsonl").read_text().splitlines()[0])
    assert first["lr"] <= cfg.experiment.finetune_lr < cfg.experiment.base_lr


def test_report_and_items_are_written(experiment):
    cfg, output, _ = experiment
    report = (output / "report.md").read_text()
    assert report.startswith("# DeRTa toy experiment") and f"| 4 | derta | 3 | {cfg.experiment.finetune_lr:.2g} |" in report
    for name in ("asr_by_prefix.png", "refusal_curve.png", "curves.json", "intervals.json"):
        assert (output / name).exists()
    assert set(json.loads((output / "curves.json").read_text())) == {"base", *ARMS}
    rows = [json.loads(line) for line in (output / "items" / "derta" / "synthetic_prefill.jsonl").read_text().splitlines()]
    assert rows and {r["seed"] for r in rows} == {4} and all("completion" in r and r["outcome"] for r in rows)
    assert json.loads((output / "seeds" / "seed-4" / "summary.json").read_text()) == json.loads(
        (output / "summary.json").read_text())  # one seed: the mean is that seed
    assert json.loads((output / "intervals.json").read_text())["derta"]["synthetic_helpful"]["accuracy"] is None


def test_seeded_configs_differ_only_in_their_seeds(experiment):
    cfg = experiment[0]
    one, two = seeded(cfg, 1), seeded(cfg, 2)
    assert (one.train.seed, one.model.tiny.seed, one.data.seed) == (1, 1, 1)
    assert two.model_copy(update={"train": one.train, "model": one.model, "data": one.data, "eval": one.eval}) == one


def test_finished_runs_are_reused(experiment):
    """A second run with the same config reuses every training run (variants re-train only what changed)."""
    cfg, output, summary = experiment
    again = run_experiment(cfg, output)
    runs = json.loads((output / "experiment.json").read_text())["per_seed"]["4"]["runs"]
    assert all(run.get("reused") for run in runs.values())
    assert (output / "seeds" / "seed-4" / "eval" / "derta" / "experiment_eval.json").exists()
    assert again == summary  # deterministic evaluation of the same checkpoints
