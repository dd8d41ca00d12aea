"""`derta` command line. Every command takes an optional `--config` (a file or a preset name in configs/) and
`--set key=value` overrides; with no config it runs the embedded default (tiny model, synthetic corpus)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

from derta.config import ConfigError, DertaConfig, load_config

VERBOSITY_FLAGS = ("--quiet", "-q", "--verbose", "-v")


class _FlagsAnywhere(TyperGroup):
    """`--quiet`/`--verbose` may follow the command (`derta train --quiet`): they are moved in front of it."""

    def parse_args(self, ctx, args):
        flags = [a for a in args if a in VERBOSITY_FLAGS]
        return super().parse_args(ctx, flags + [a for a in args if a not in VERBOSITY_FLAGS])


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=_FlagsAnywhere,
                  help="DeRTa on Ray: data preparation, training, serving and evaluation.")
data_app = typer.Typer(no_args_is_help=True, help="Corpus -> DeRTa training examples.")
app.add_typer(data_app, name="data")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML file or preset name (configs/<name>.yaml)")
SetOpt = typer.Option(None, "--set", help="override, e.g. --set train.lr=1e-4 (repeatable)")
JudgeOpt = typer.Option(None, "--judge", help="rules | endpoint | hf | classifier (sets eval.judge; "
                        "endpoint/hf settings: --set eval.judge_url=... eval.judge_style=llamaguard ...)")


def _with_judge(set_: Optional[List[str]], judge_name: Optional[str]) -> List[str]:
    return list(set_ or []) + ([f"eval.judge={judge_name}"] if judge_name else [])


@app.callback()
def _verbosity(quiet: bool = typer.Option(False, "--quiet", "-q", help="print results and errors only"),
               verbose: bool = typer.Option(False, "--verbose", "-v", help="also print Ray's own logs")):
    """Console verbosity for every command (default: our lines and progress bars only)."""
    from derta.progress import set_verbosity

    if quiet and verbose:
        _fail("--quiet and --verbose exclude each other")
    if quiet or verbose:  # else keep an inherited DERTA_VERBOSITY (a Ray job started by a `derta` command)
        set_verbosity("quiet" if quiet else "verbose")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _config(config: Optional[str], overrides: Optional[List[str]]) -> DertaConfig:
    try:
        return load_config(config or "tiny", overrides)
    except ConfigError as err:
        _fail(str(err))


def _guard(fn):
    """Turn expected failures (bad config, bad data) into one clear line instead of a traceback."""
    from derta.data import DataQualityError
    from derta.trainer import TrainingFailed
    from derta.transforms import RefusalTokenError

    try:
        return fn()
    except (ConfigError, DataQualityError, RefusalTokenError, FileNotFoundError, TrainingFailed, ValueError) as err:
        _fail(str(err))


@data_app.command("prepare")
def data_prepare(
    output: Path = typer.Option(..., "--output", "-o", help="directory for Parquet, stats.json, quarantine.jsonl"),
    config: Optional[str] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    input_: Optional[List[str]] = typer.Option(None, "--input", "-i", help="read these files/dirs instead"),
    mode: Optional[str] = typer.Option(None, "--mode", help="vanilla | recaug | derta"),
):
    """Write the tokenized DeRTa dataset (Parquet) and a stats report."""
    overrides = list(set_ or []) + ([f"data.mode={mode}"] if mode else [])
    cfg = _config(config, overrides)

    def run():
        from derta.data import write_prepared
        from derta.modeling import resolve_model_path
        from derta.preflight import check_tokens, load_run_tokenizer
        from derta.runtime import init_ray

        tokenizer_path = resolve_model_path(cfg.model, cfg.data.synthetic, cfg.data.refusal_string)
        check_tokens(cfg, load_run_tokenizer(cfg, tokenizer_path))  # a bad refusal string names its field
        init_ray()
        stats = write_prepared(cfg, cfg.model.tokenizer or tokenizer_path, output, input_)
        typer.echo(json.dumps({k: stats[k] for k in ("mode", "source_rows", "examples_by_kind", "quarantined",
                                                     "padding_waste")}, indent=2))
        typer.echo(f"wrote {stats['examples_dir']} and {output / 'stats.json'}")

    _guard(run)


@app.command()
def train(
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="run directory (default train.output_dir)"),
    config: Optional[str] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="train nothing: check config, tokenizer, refusal/probe "
                                                          "strings, end of turn, BOS, lengths, and the per-GPU memory "
                                                          "plan (OUTPUT/plan.json with --output); print the report; "
                                                          "fail if the plan does not fit the GPUs"),
):
    """DeRTa fine-tuning with Ray Train; writes checkpoints, OUTPUT/final and OUTPUT/metrics.jsonl."""
    cfg = _config(config, set_)

    def run():
        if dry_run:
            return _dry_run(cfg, output)
        from derta.trainer import run_training

        final = run_training(cfg, output)
        typer.echo(f"final model: {final}")

    _guard(run)


def _dry_run(cfg: DertaConfig, output: Optional[Path]) -> None:
    """Preflight (derta.preflight) + memory plan (derta.plan); the JSON report is printed last."""
    from derta.plan import PlanDoesNotFit, describe, make_plan, write_plan
    from derta.preflight import run_preflight

    report = run_preflight(cfg)
    try:
        plan = write_plan(cfg, report["model"], output) if output else make_plan(cfg, report["model"])
    except PlanDoesNotFit as err:
        where = f" (plan: {output / 'plan.json'})" if output else ""
        _fail(f"{err}{where}", code=3)
    if not plan["fits"]:
        _fail(f"does not fit: {describe(plan)}", code=3)
    typer.echo(f"memory plan: {describe(plan)}" + (f"; wrote {output / 'plan.json'}" if output else ""))
    typer.echo(json.dumps({**report, "plan": plan}, indent=2))


@app.command()
def serve(
    config: Optional[str] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    model: Optional[str] = typer.Option(None, "--model", help="checkpoint dir, adapter dir or hub id"),
    port: Optional[int] = typer.Option(None, "--port", help="HTTP port (default serve.port): HAProxy in front of the "
                                       "ingress replicas; Serve's proxy with --set serve.direct_ingress=false"),
    insecure: bool = typer.Option(False, "--insecure", help="allow no API key on a non-loopback serve.host"),
):
    """Serve /generate, /probe and /v1/* on serve.host (127.0.0.1 by default; model: the newest local checkpoint)."""
    cfg = _config(config, list(set_ or []) + (["serve.insecure=true"] if insecure else []))

    def run():
        from serve.app import run_local

        run_local(cfg, model=model, port=port)

    _guard(run)


@app.command("eval")
def eval_(
    output: Path = typer.Option(..., "--output", "-o"),
    model: List[str] = typer.Option(..., "--model", "-m", help="checkpoint/HF path/hub id or http(s) endpoint URL"),
    suite: Optional[List[str]] = typer.Option(None, "--suite", "-s"),
    judge_name: Optional[str] = JudgeOpt,
    config: Optional[str] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
):
    """Evaluate one or more models on attack, over-refusal and helpfulness suites; write a report."""
    cfg = _config(config, _with_judge(set_, judge_name))

    def run():
        from derta.evaluation import run_eval

        summary = run_eval(cfg, models=model, suites=suite or cfg.eval.suites, output=output)
        typer.echo(json.dumps(summary, indent=2))

    _guard(run)


@app.command()
def judge(
    input_: Path = typer.Option(..., "--input", "-i", help="JSONL rows with prompt and completion (optional prefix)"),
    output: Path = typer.Option(..., "--output", "-o"),
    judge_name: Optional[str] = JudgeOpt,
    config: Optional[str] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
):
    """Judge any outputs file: adds refused, attack_success, reason and judge to each row."""
    cfg = _config(config, _with_judge(set_, judge_name))

    def run():
        from derta.judge_file import judge_file

        counts = judge_file(input_, output, cfg.eval)
        extra = "" if not counts["judge_model_items"] else \
            f" ({counts['judge_fallbacks']} fell back to the rules, {counts['judge_parse_failures']} unparsable)"
        typer.echo(f"judged {counts['rows']} rows -> {output}{extra}")

    _guard(run)


@app.command()
def experiment(
    output: Path = typer.Option(Path("runs/experiment"), "--output", "-o"),
    config: Optional[str] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1,
                                        help="repetitions, mean + 95% interval (default experiment.seeds = 3; "
                                             "1 = quick mode)"),
):
    """The paper's finding at toy scale: base -> vanilla / recaug / derta, then prefilling attacks."""
    cfg = _config(config or "experiment", list(set_ or []) + ([f"experiment.seeds={seeds}"] if seeds else []))

    def run():
        from derta.experiment import run_experiment

        summary = run_experiment(cfg, output)
        typer.echo(json.dumps(summary, indent=2))

    _guard(run)


@app.command()
def probe(
    model: str = typer.Option(..., "--model", "-m", help="checkpoint dir, adapter dir, hub id or 'tiny'"),
    input_: Path = typer.Option(..., "--input", "-i", help="JSONL, one /probe body per line: prompt (or messages), "
                                                           "response, optional id and threshold"),
    output: Path = typer.Option(..., "--output", "-o", help="directory for curves.jsonl, refusal_curves.png"),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="first_crossing threshold "
                                                                        "(default serve.probe_threshold)"),
    config: Optional[str] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
):
    """P(refusal) at every position of each response (the /probe computation, no server): curves + a plot."""
    cfg = _config(config, set_)

    def run():
        from derta.probe_run import run_probe

        summary = run_probe(cfg, model, input_, output, threshold)
        typer.echo(f"probed {summary['items']} items: {summary['curves']}, {summary['plot']}")

    _guard(run)


@app.command()
def demo(output: Path = typer.Option(Path("runs/demo"), "--output", "-o"),
         config: Optional[str] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Vanilla vs DeRTa on the embedded default: P(refusal) after k harmful tokens, table + PNG (preset: demo)."""
    cfg = _config(config or "demo", set_)

    def run():
        from derta.demo import run_demo

        run_demo(cfg, output)

    _guard(run)


cluster_app = typer.Typer(no_args_is_help=True, help="KubeRay manifests for a preset (docs/cluster.md).")
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("render")
def cluster_render(
    config: str = typer.Option(..., "--config", "-c", help="preset name or YAML file"),
    output_dir: Path = typer.Option(Path("cluster"), "--output-dir", "-o", help="where the manifests go"),
    image: Optional[str] = typer.Option(None, "--image", help="image built from ./Dockerfile (default derta:VERSION-rayX.Y.Z)"),
    storage: str = typer.Option("derta-shared", "--storage", help="ReadWriteMany PVC mounted at /mnt/shared"),
    model: Optional[str] = typer.Option(None, "--model", help="model to serve/evaluate (default <train output>/final)"),
    gpus_per_pod: int = typer.Option(8, "--gpus-per-pod", min=1, help="GPUs per training worker pod (one node)"),
    memory_per_gpu: int = typer.Option(64, "--memory-per-gpu", min=1, help="GiB of pod memory per GPU"),
    code_url: Optional[str] = typer.Option(None, "--code-url", help="development: zip URL of the code (runtime env)"),
):
    """Write RayJobs (prepare, train, eval), a RayService and an autoscaling RayCluster for a preset."""
    from derta.cluster_render import RenderError, RenderOptions, write

    opts = RenderOptions(preset=config, image=image, storage=storage, model=model, gpus_per_pod=gpus_per_pod,
                         memory_per_gpu_gi=memory_per_gpu, code_url=code_url)
    try:
        for path in write(opts, output_dir):
            typer.echo(f"wrote {path}")
    except (RenderError, ConfigError) as err:
        _fail(str(err))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
