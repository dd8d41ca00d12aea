"""`derta demo`: trains vanilla and DeRTa the same way, probes both at every k and writes the table and the plot."""
import json

import pytest

from derta.demo import KS, MODES, PLOT, run_demo

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


def test_demo_trains_both_modes_and_writes_table_and_plot(tiny_config, tmp_path, capsys):
    small = tiny_config.data.synthetic.model_copy(update={"n_helpful": 300, "n_harmful": 100, "n_lookalike": 20})
    cfg = tiny_config.model_copy(update={
        "data": tiny_config.data.model_copy(update={"synthetic": small, "max_length": 192}),
        "train": tiny_config.train.model_copy(update={"max_steps": 3, "log_every": 3})})
    summary = run_demo(cfg, tmp_path / "demo", n_prompts=4)
    by_k = summary["p_refusal_after_k_harmful_tokens"]
    assert list(by_k) == list(MODES) and all(list(by_k[m]) == [str(k) for k in KS] for m in MODES)
    assert all(0 <= p <= 1 for m in MODES for p in by_k[m].values())
    for mode in MODES:  # each model was trained with its own data mode
        stats = json.loads((tmp_path / "demo" / mode / "run.json").read_text())
        assert ("rto" in stats["examples_by_kind"]) == (mode == "derta")
    assert (tmp_path / "demo" / PLOT).stat().st_size > 1000
    assert json.loads((tmp_path / "demo" / "demo_summary.json").read_text()) == summary
    out = capsys.readouterr().out
    assert all(line.split()[0] in out for line in MODES) and "k=40" in out
