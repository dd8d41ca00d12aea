"""Driver side of training: validate everything up front, build the Ray Data pipeline, run `TorchTrainer`."""
from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# torch (train_loop, checkpoint) is imported inside run_training, while Ray starts: not at `derta train` start-up
from derta.config import ConfigError, DertaConfig


class TrainingFailed(RuntimeError):
    pass


def preflight(cfg: DertaConfig, cluster: bool = True) -> str:
    """Fail before any worker starts: model path, refusal token, GPUs (`cluster`: needs Ray), batch fit. Returns
    the model path."""
    from derta.modeling import resolve_model_path
    from derta.preflight import check_tokens, load_run_tokenizer

    model_path = resolve_model_path(cfg.model, cfg.data.synthetic, cfg.data.refusal_string)
    check_tokens(cfg, load_run_tokenizer(cfg, model_path))
    if cfg.data.max_length < 16:
        raise ConfigError(f"data.max_length={cfg.data.max_length} leaves no room for prompt + response")
    if cluster:
        check_gpus(cfg)
    return model_path


def check_gpus(cfg: DertaConfig) -> None:
    import ray

    train = cfg.train
    if train.use_gpu:
        available = ray.cluster_resources().get("GPU", 0)
        needed = train.num_workers * (train.resources_per_worker or {}).get("GPU", 1)
        # an autoscaling cluster (RAY_ADDRESS set) may add GPU nodes on demand; a local instance cannot
        if available < needed and not os.environ.get("RAY_ADDRESS"):
            raise ConfigError(f"train.use_gpu=true needs {needed:g} GPUs but the Ray cluster has {available:g}; "
                              "set train.use_gpu=false or add GPU nodes")


def run_training(cfg: DertaConfig, output: Path | str | None = None) -> Path:
    from derta.runtime import init_ray, trainer_class

    output = Path(output or cfg.train.output_dir).resolve()
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"output_dir": str(output)})})
    with ThreadPoolExecutor(1, thread_name_prefix="derta-preflight") as pool:
        # the model/tokenizer checks (and their torch/transformers imports, seconds of CPU) run while ray.init
        # waits for the Ray processes it started; a private instance starts lean (derta.runtime)
        checked = pool.submit(preflight, cfg, False)
        init_ray(dashboard=False)
        model_path = checked.result()
    check_gpus(cfg)
    output.mkdir(parents=True, exist_ok=True)

    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    from derta.checkpoint import SHARD_PATTERNS
    from derta.progress import training_progress
    from derta.train_data import count_rows, prepare_training_data
    from derta.train_loop import STATE_FILE, plan_steps, train_loop_per_worker

    # prepared once to Parquet (+ stats.json, quarantine.jsonl) under output/data; every worker streams its own
    # deterministic share of those files (derta.train_data), so no dataset goes to TorchTrainer
    stats = prepare_training_data(cfg, cfg.model.tokenizer or model_path, output / "data")
    counts = stats["examples_by_kind"]
    num_rows = count_rows(stats["examples_dir"])
    train = cfg.train
    try:
        batches_per_epoch, total_steps = plan_steps(num_rows, train.num_workers, train.batch_size, train.grad_accum,
                                                    train.epochs, train.max_steps)
    except ValueError as err:
        raise ConfigError(f"{err}; lower train.batch_size or train.num_workers") from None
    print(f"[derta] {num_rows} training rows {counts}; {total_steps} steps on {train.num_workers} workers",
          flush=True)

    trainer = trainer_class(train)(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "model_path": model_path,
                           "output_dir": str(output), "examples_dir": stats["examples_dir"],
                           "batches_per_epoch": batches_per_epoch,
                           "total_steps": total_steps},
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker=train.resources_per_worker,
                                     placement_strategy=train.placement_strategy),
        run_config=RunConfig(
            name=train.run_name, storage_path=str(output / "checkpoints"),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
            logging_config=LoggingConfig(log_level="WARNING")),
    )
    try:
        with training_progress(output / "metrics.jsonl", total_steps):  # steps, loss, tok/s from metrics.jsonl
            result = trainer.fit()
    except Exception as err:  # noqa: BLE001 - Ray wraps worker errors; keep their message, drop our frames
        raise TrainingFailed(f"training failed after {train.max_failures} retries: {err}") from None
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint: {result.error}")
    final = output / "final"
    with result.checkpoint.as_directory() as directory:
        if final.exists():
            shutil.rmtree(final)
        # the HF export of the last checkpoint, without its trainer state / DCP shards
        shutil.copytree(directory, final, ignore=shutil.ignore_patterns(STATE_FILE, *SHARD_PATTERNS))
    from derta.modeling import load_tokenizer
    from derta.tokens import write_generation_config

    write_generation_config(final, load_tokenizer(str(final)))  # eos list: eos + the template's end of turn
    (output / "run.json").write_text(json.dumps({"final": str(final), "total_steps": total_steps,
                                                 "rows": num_rows, "examples_by_kind": counts}, indent=2))
    return final
