"""Console contract: verbosity flags, progress bars that degrade to plain lines, and which worker lines are kept."""
from __future__ import annotations

import io
import json

import pytest

from derta import progress
from derta.progress import Progress, keep_worker_line, training_progress


@pytest.fixture(autouse=True)
def normal_verbosity(monkeypatch):
    monkeypatch.setenv(progress.VERBOSITY_ENV, "normal")


def test_plain_lines_when_not_a_terminal_with_rate_eta_and_postfix():
    out = io.StringIO()  # not a TTY
    with Progress("prepare", total=4, unit="rows", interval=0, stream=out) as bar:
        bar.update(1)
        bar.update(3, loss="1.2345")
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("[derta] prepare: 1/4 rows (25%),") and "rows/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("[derta] prepare: 4/4 rows (100%),") and "loss 1.2345" in lines[-1]
    assert len(lines) == 2  # closing does not repeat a line that already showed the final count


def test_plain_lines_are_periodic_not_per_update():
    out = io.StringIO()
    bar = Progress("eval", total=1000, unit="items", interval=3600, stream=out)
    for _ in range(1000):
        bar.update()
    assert out.getvalue() == ""  # nothing until the interval passes ...
    bar.close()
    assert len(out.getvalue().splitlines()) == 1  # ... and one summary line at the end


def test_terminal_gets_a_tqdm_bar():
    out = io.StringIO()
    with Progress("train", total=2, unit="steps", stream=out, tty=True) as bar:
        bar.update(2, loss="0.5")
    assert "[derta] train" in out.getvalue() and "2/2" in out.getvalue() and "loss 0.5" in out.getvalue()


def test_quiet_prints_nothing(monkeypatch, capsys):
    monkeypatch.setenv(progress.VERBOSITY_ENV, "quiet")
    out = io.StringIO()
    with Progress("x", total=1, interval=0, stream=out, tty=False) as bar:
        bar.update()
    progress.say("hello")
    assert out.getvalue() == "" and capsys.readouterr().out == ""


def test_training_progress_follows_metrics_jsonl(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    out = io.StringIO()
    with training_progress(metrics, total_steps=4, poll_s=0.01) as bar:
        bar.stream, bar.interval = out, 0
        with metrics.open("w") as f:
            for step in (2, 4):
                f.write(json.dumps({"step": step, "loss": 1.0 / step, "tokens_per_s": 100.0 * step}) + "\n")
            f.write('{"step": 6, "lo')  # a line being written when training ends is not read half-way
    assert bar.done == 4 and bar.postfix == {"loss": "0.2500", "tok_s": "400"}
    assert out.getvalue().splitlines()[-1].startswith("[derta] train: 4/4 steps (100%)")


def test_worker_lines_kept_in_normal_mode():
    assert keep_worker_line("[derta] resumed at step 4 (epoch 0, batch 4)")
    assert not keep_worker_line("[derta] step 2/20 loss 1.0")  # the driver's bar shows these
    assert not keep_worker_line("Progress bars disabled. To enable, set ...")
    assert not keep_worker_line("[2026-01-01 12:00:00,000 E 1 2] core_worker.cc:123: PreemptionWatcher ...")


def test_verbosity_flags_anywhere_on_the_command_line(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from derta.cli import app

    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"prompt": "p", "completion": "Sorry, I can't help."}) + "\n")
    runner = CliRunner()
    for args, level in ((["judge", "-i", str(rows), "-o", str(tmp_path / "o.jsonl"), "--quiet"], "quiet"),
                        (["--verbose", "judge", "-i", str(rows), "-o", str(tmp_path / "o.jsonl")], "verbose")):
        monkeypatch.setenv(progress.VERBOSITY_ENV, "normal")
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert progress.verbosity() == level
    result = runner.invoke(app, ["judge", "--quiet", "--verbose", "-i", str(rows), "-o", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 2 and "exclude each other" in result.output


def test_ray_console_filter_keeps_our_lines_and_raylet_errors(capsys):
    from ray._private import worker as ray_worker

    progress.filter_ray_console()
    progress.filter_ray_console()  # idempotent (init_ray after ray.shutdown)
    ray_worker.global_worker_stdstream_dispatcher.emit({
        "lines": ["[derta] resumed at step 4 (epoch 0, batch 4)", "[derta] step 2/20 loss 1.0",
                  "Progress bars disabled. To enable, set ..."], "pid": 123, "ip": "127.0.0.1", "is_err": False})
    ray_worker.print_to_stdstream({"lines": ["WARNING: 8 PYTHON worker processes have been started on node"],
                                   "pid": "raylet", "is_err": False}, ignore_prefix=False)
    ray_worker.print_to_stdstream({"lines": ["Task was killed due to the node running low on memory."],
                                   "pid": "raylet", "is_err": False}, ignore_prefix=False)
    out = capsys.readouterr().out
    assert "[derta] resumed at step 4" in out and "running low on memory" in out
    assert "step 2/20" not in out and "Progress bars disabled" not in out and "PYTHON worker processes" not in out
