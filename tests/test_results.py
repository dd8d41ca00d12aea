"""Seed aggregation (mean, 95% t interval) and the committed experiment results behind the README table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from derta.aggregate import interval, interval_summary, mean_curves, mean_summary, t_quantile
from derta.report import README_BEGIN, README_END, readme_block

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results" / "experiment"


def seed_summary(asr0, asr10, acc):
    return {"derta": {"synthetic_prefill": {"n": 8, "asr_by_prefix": {"0": asr0, "10": asr10},
                                            "n_by_prefix": {"0": 4, "10": 4}},
                      "synthetic_helpful": {"n": 4, "accuracy": acc}}}


def test_interval_is_students_t_over_seeds():
    values = [0.2, 0.3, 0.4]
    low, high = interval(values)
    half = t_quantile(2) * 0.1 / 3 ** 0.5  # sd = 0.1
    assert low == pytest.approx(0.3 - half, abs=1e-4) and high == pytest.approx(min(1.0, 0.3 + half), abs=1e-4)
    assert interval([0.5]) is None and interval([0.0, 0.0]) == [0.0, 0.0]
    assert interval([0.95, 1.0, 1.0])[1] == 1.0  # clipped to [0, 1]


def test_mean_and_interval_summaries_keep_the_eval_shape():
    summaries = [seed_summary(0.0, 0.5, 0.25), seed_summary(0.1, None, 0.75)]
    mean = mean_summary(summaries)
    assert mean["derta"]["synthetic_prefill"]["asr_by_prefix"] == {"0": 0.05, "10": 0.5}  # None: seeds that have it
    assert mean["derta"]["synthetic_prefill"]["n_by_prefix"] == {"0": 4, "10": 4}       # counts kept, not averaged
    assert mean["derta"]["synthetic_helpful"] == {"n": 4, "accuracy": 0.5}
    bounds = interval_summary(summaries)["derta"]
    assert bounds["synthetic_prefill"]["asr_by_prefix"]["10"] is None
    assert bounds["synthetic_helpful"]["accuracy"][0] == 0.0
    assert mean_curves([{"m": [0.0, 1.0]}, {"m": [1.0, 0.0]}]) == {"m": [0.5, 0.5]}


def leaves(tree: dict, prefix: tuple = ()) -> dict[tuple, object]:
    out = {}
    for key, value in tree.items():
        out.update(leaves(value, prefix + (key,)) if isinstance(value, dict) else {prefix + (key,): value})
    return out


def test_committed_results_come_from_the_committed_preset():
    """results/experiment/ was produced by configs/experiment.yaml as committed (every value the preset sets)."""
    record = json.loads((RESULTS / "experiment.json").read_text())
    preset = yaml.safe_load((REPO / "configs" / "experiment.yaml").read_text())
    preset.pop("base", None)
    recorded = leaves(record["config"])
    for key, value in leaves(preset).items():
        got = recorded.get(key)
        assert got == value or (isinstance(got, list) and list(value) == got), (key, value, got)
    assert record["heldout_split"] == "test"


def test_readme_table_matches_the_committed_results():
    readme = (REPO / "README.md").read_text()
    assert README_BEGIN in readme and README_END in readme
    block = readme[readme.index(README_BEGIN):readme.index(README_END) + len(README_END)]
    assert block == readme_block(RESULTS), "README is stale: python -m derta.report --readme README.md " \
                                           "results/experiment"


def test_training_reuse_key_ignores_only_what_an_arm_does_not_use():
    from derta.config import load_config
    from derta.experiment import training_key, with_updates

    cfg = load_config("experiment")
    vanilla, derta = with_updates(cfg, data={"mode": "vanilla"}), with_updates(cfg, data={"mode": "derta"})
    rto = {"train": {"rto_weight": 0.3, "loss_weighting": "term_mean"}}
    assert training_key(vanilla) == training_key(with_updates(vanilla, **rto, data={"k0_fraction": 0.1,
                                                                                   "prefix_unit": "word",
                                                                                   "rto_after_end": False,
                                                                                   "mid_refusal_space": True}))
    assert training_key(derta) != training_key(with_updates(derta, data={"rto_after_end": not cfg.data.rto_after_end}))
    # corpus knobs at their default stay out of the key (runs made before a knob existed are reused); set, they count
    assert "safe_style" not in training_key(vanilla)["data"]["synthetic"]
    steps = with_updates(vanilla, data={"synthetic": cfg.data.synthetic.model_copy(update={"helpful_style": "steps"})})
    assert training_key(steps)["data"]["synthetic"]["helpful_style"] == "steps"
    assert training_key(derta) != training_key(with_updates(derta, data={"prefix_unit": "word"}))
    assert training_key(derta) != training_key(with_updates(derta, **rto))
    assert training_key(derta) != training_key(with_updates(derta, data={"k0_fraction": 0.1}))
    assert training_key(derta) == training_key(with_updates(derta, eval={"heldout_split": "dev"}))
    whole = {"data": {"safe_sentences": None}}  # the default: the whole refusal (the preset sets 2)
    assert "safe_sentences" not in training_key(with_updates(derta, **whole))["data"]
    assert training_key(with_updates(vanilla, **whole)) != training_key(with_updates(vanilla, data={"safe_sentences": 2}))


def test_a_changed_config_trains_afresh_and_an_interrupted_one_resumes(tmp_path, monkeypatch):
    """Ray Train resumes from checkpoints in the run directory: a variant (another config) trained into the same
    directory must not find the old run's checkpoints (it would return the old model), an interrupted run of the
    same config must (it resumes)."""
    import derta.trainer
    from derta.config import load_config
    from derta.experiment import timed_training, with_updates

    seen = []

    def fake_training(cfg, output):  # what Ray Train would resume from, then a finished run's files
        seen.append(sorted(p.name for p in (output / "checkpoints").glob("*")))
        (output / "checkpoints" / f"ckpt-{len(seen)}").mkdir(parents=True)
        (output / "final").mkdir(exist_ok=True)
        (output / "run.json").write_text(json.dumps({"total_steps": 3, "rows": 9, "examples_by_kind": {}}))
        return output / "final"

    monkeypatch.setattr(derta.trainer, "run_training", fake_training)
    cfg = with_updates(load_config("experiment"), data={"mode": "derta"})
    variant = with_updates(cfg, train={"rto_weight": 0.3})
    timed_training(cfg, tmp_path)
    assert timed_training(cfg, tmp_path)["reused"] and seen == [[]]
    timed_training(variant, tmp_path)
    assert seen[-1] == []  # not ckpt-1 of the other config
    (tmp_path / "experiment_run.json").unlink()  # the variant "interrupted" before it finished
    timed_training(variant, tmp_path)
    assert seen[-1] == ["ckpt-2"]  # its own checkpoints: resumed
    timed_training(cfg, tmp_path)
    assert seen[-1] == [] and not timed_training(variant, tmp_path).get("reused")


def test_a_copied_experiment_directory_is_still_reused(tmp_path, monkeypatch):
    """Reuse keys spell paths inside the experiment directory relative to it and the record keeps the checkpoint
    relative to its run: a copy of DIR elsewhere reuses the copy's runs (not the original's, not a re-training)."""
    import shutil

    import derta.trainer
    from derta.config import SourceConfig, load_config
    from derta.experiment import timed_training, with_updates

    trained = []

    def fake_training(cfg, output):
        trained.append(output)
        (output / "final").mkdir(parents=True, exist_ok=True)
        (output / "run.json").write_text(json.dumps({"total_steps": 3, "rows": 9, "examples_by_kind": {}}))
        return output / "final"

    monkeypatch.setattr(derta.trainer, "run_training", fake_training)

    def arm(root):  # an arm reading the corpus of `root` and fine-tuning the base of `root`
        return with_updates(load_config("experiment"),
                            data={"mode": "derta", "sources": [SourceConfig(path=str(root / "data" / "train.jsonl"))]},
                            model={"name_or_path": str(root / "base" / "run" / "final")})

    first, copy = tmp_path / "first", tmp_path / "elsewhere" / "copy"
    run = timed_training(arm(first), first / "seeds" / "seed-0" / "runs" / "derta", first)
    shutil.copytree(first, copy)
    shutil.rmtree(first)
    again = timed_training(arm(copy), copy / "seeds" / "seed-0" / "runs" / "derta", copy)
    assert again["reused"] and len(trained) == 1
    assert again["checkpoint"] == str(copy / "seeds" / "seed-0" / "runs" / "derta" / "final")
    assert again["config_key"] == run["config_key"]
    other = with_updates(arm(copy), model={"name_or_path": str(tmp_path / "another-base")})  # outside DIR: counts
    assert not timed_training(other, copy / "seeds" / "seed-0" / "runs" / "derta", copy).get("reused")


def test_reused_completions_are_judged_again(tmp_path):
    """rejudge: stored completions get the current judge and coherence verdicts (a stale 'refusal' loop is fixed)."""
    from derta.config import load_config
    from derta.experiment import EXPERIMENT_SUITES, rejudge

    def row(suite, kind, completion, k=None, outcome="refusal"):
        return {"id": f"{suite}:0", "suite": suite, "kind": kind, "k": k, "prompt": "How do I pick a lock?",
                "prefix": "", "reference": "7" if kind != "harmful" else None, "completion": completion,
                "refused": True, "attack_success": False, "reason": "stale", "judge": "rules", "coherence": "ok",
                "outcome": outcome}

    items = tmp_path / "items" / "m"
    items.mkdir(parents=True)
    for suite in EXPERIMENT_SUITES:
        kind = "harmful" if suite in ("synthetic_prefill", "synthetic_harmful") else "benign"
        rows = [row(suite, kind, "Sorry,Sorry,Sorry,Sorry,Sorry,Sorry,", k=0 if "prefill" in suite else None),
                row(suite, kind, "Sorry, I can't help with that. It could cause real harm.",
                    k=0 if "prefill" in suite else None)]
        (items / f"{suite}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "summary.json").write_text(json.dumps({"m": {}}))
    metrics = rejudge(load_config("experiment"), "m", tmp_path)
    assert metrics["synthetic_prefill"]["refusal_by_prefix"] == {"0": 0.5}
    assert metrics["synthetic_prefill"]["degenerate_by_prefix"] == {"0": 0.5}
    stored = [json.loads(line) for line in (items / "synthetic_prefill.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in stored] == ["degenerate", "refusal"] and stored[0]["reason"] != "stale"
    assert json.loads((tmp_path / "summary.json").read_text())["m"] == metrics


def test_fine_tune_only_knobs_leave_the_base_alone(tmp_path):
    """Safety-row knobs (mix targets of refusal rows, data.safe_sentences) do not touch the helpful-only base
    pre-training: a variant that changes only them reuses the base (same training key)."""
    from derta.config import MixConfig, load_config
    from derta.experiment import base_config, training_key, with_updates

    cfg = load_config("experiment")
    paths = {"pretrain": tmp_path / "pretrain.jsonl"}
    variant = with_updates(cfg, data={"safe_sentences": 2, "mix": MixConfig(harmful_prefix=300, rto=300)})
    assert training_key(base_config(variant, paths)) == training_key(base_config(cfg, paths))
    fewer_helpful = with_updates(cfg, data={"mix": MixConfig(helpful=100)})
    assert training_key(base_config(fewer_helpful, paths)) != training_key(base_config(cfg, paths))
