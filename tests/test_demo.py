"""`derta demo`: trains vanilla and DeRTa the same way, probes both at every k and writes the table and the plot."""
import json

import pytest

from derta.demo import KS, MODES, PLOT, run_demo


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_demo_trains_both_modes_and_writes_table_and_plot(tiny_config, tmp_path, capsys):
    small = tiny_config.data.synthetic.model_copy(update={"n_helpful": 300, "n_harmful": 100, "n_lookalike": 20})
    cfg = tiny_config.model_copy(update={
        "data": tiny_config.data.model_copy(update={"synthetic": small, "max_length": 192}),
        "train": tiny_config.train.model_copy(update={"max_steps": 3, "log_every": 3})})
    summary = run_demo(cfg, tmp_path / "demo", n_prompts=4)
    by_k = summary["p_refusal_after_k_harmful_tokens"]
    assert list(by_k) == list(MODES) and all(list(by_k[m]) == [str(k) for k in KS] for m in MODES)
    assert all(0 <= p <= 1 for m in MODES for p in by_k[m].values())
    assert list(summary["p_refusal_helpful_prompt"]) == list(MODES) and summary["helpful_prompts"] == 4
    assert all(0 <= p <= 1 for p in summary["p_refusal_helpful_prompt"].values())
    for mode in MODES:  # each model was trained with its own data mode
        stats = json.loads((tmp_path / "demo" / mode / "run.json").read_text())
        assert ("rto" in stats["examples_by_kind"]) == (mode == "derta")
    assert (tmp_path / "demo" / PLOT).stat().st_size > 1000
    assert json.loads((tmp_path / "demo" / "demo_summary.json").read_text()) == summary
    out = capsys.readouterr().out
    assert all(line.split()[0] in out for line in MODES) and "k=40" in out and "helpful prompts" in out


def test_demo_preset_trains_both_modes_the_same_steps():
    """The README's claim: same init, steps, batch and lr for both models; only the data mode differs."""
    from derta.config import load_config

    cfg = load_config("demo")
    assert cfg.train.max_steps is not None  # an epoch count would give derta (more rows: RTO) more steps
    assert cfg.model.name_or_path == "tiny"  # one seeded random init for both
