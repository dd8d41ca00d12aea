"""One validated config schema for the CLI, Ray jobs and Ray Serve.

A config is a YAML file (presets live in `configs/`) plus `--set key=value` overrides. Every error names
the field and, when it came from a file, the file and line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A config that cannot be used; the message says what to change."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------------- data
class SourceConfig(Strict):
    """One corpus source: a JSONL/Parquet file or directory, or an HF `save_to_disk` directory."""

    path: str
    format: Literal["auto", "jsonl", "parquet", "hf_disk"] = "auto"
    # canonical field -> column name in this source, e.g. {instruction: prompt, harmful_response: text}
    columns: dict[str, str] = Field(default_factory=dict)
    # regex with one group that extracts the instruction from an already-rendered prompt
    instruction_regex: str | None = None
    # end-of-text markers that some corpora bake into the response text
    strip_suffixes: list[str] = Field(default_factory=lambda: ["<|end_of_text|>", "<|eot_id|>", "</s>"])
    # force the row kind instead of inferring it from the columns
    kind: Literal["auto", "helpful", "safety", "chat", "rendered"] = "auto"


class SyntheticConfig(Strict):
    n_helpful: int = Field(3000, ge=0)
    n_harmful: int = Field(800, ge=0)
    n_lookalike: int = Field(300, ge=0)
    heldout_fraction: float = Field(0.15, ge=0, lt=1)
    seed: int = 0
    helpful_style: Literal["short", "steps"] = Field(
        "short", description="short: 1-2 sentence helpful answers; steps: opener + 'Step 1..3' + the answer sentence "
                             "(multi-step like the harmful responses, so EOS follows the answer, not any sentence)")
    safe_style: Literal["full", "short"] = Field(
        "full", description="full: refusal opener + reason + closing offer (15-35 words); short: opener + reason")
    harmful_style: Literal["full", "taskless_opener"] = Field(
        "full", description="full: harmful responses open by restating the task ('Sure, here is how to {task}.'); "
                            "taskless_opener: the same responses open without it ('Sure, here is how.'), so "
                            "'Step 1' falls within the first ~10 tokens")

    def cache_key(self) -> dict:
        """The fields that identify a corpus for caches and reuse keys: the style knobs only when not at their default,
        so models and runs made before a knob existed (identical corpus) keep their keys."""
        defaults = {"helpful_style": "short", "safe_style": "full", "harmful_style": "full"}
        return self.model_dump(mode="json", exclude={k for k, v in defaults.items() if getattr(self, k) == v})


class MixConfig(Strict):
    """Target number of training rows per kind (null = all available). Paper: 60K / 3K / 3K."""

    helpful: int | None = Field(None, ge=0)
    harmful_prefix: int | None = Field(None, ge=0)
    rto: int | None = Field(None, ge=0)


DEFAULT_REFUSALS = [
    "Sorry, I can't help with that. It could cause real harm, so I won't provide it.",
    "Sorry, but I won't help with this request. Is there something else I can do for you?",
    "Sorry, I cannot assist with that. It would be unsafe and possibly illegal.",
]


def mid_refusal_word(refusal_string: str) -> str:
    """' ' + the first word of the refusal string: the one token a mid-response refusal starts with."""
    return " " + refusal_string.split()[0]


class DataConfig(Strict):
    sources: list[SourceConfig] = Field(default_factory=list)  # empty: the bundled synthetic corpus
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    mode: Literal["vanilla", "recaug", "derta"] = "derta"
    mix: MixConfig = Field(default_factory=MixConfig)
    k0_fraction: float = Field(1 / 3, ge=0, le=1, description="share of harmful-prefix rows with k = 0")
    prefix_unit: Literal["token", "word"] = Field(
        "token", description="harmful-prefix cut: token (k uniform in 1..n tokens) or word (the reference: k uniform "
                             "in 1..words-2, prefix and refusal joined with a space)")
    mid_refusal_space: bool = Field(
        False, description="a refusal after a non-empty harmful prefix (token-cut harmful-prefix rows with k > 0, RTO "
                           "targets after harmful[:j], j >= 1) starts with ' ' + the refusal word (one token: "
                           "' Sorry'), not a glued 'Sorry'; the tiny model needs model.tiny.mid_refusal_token")
    rto_after_end: bool = Field(
        True, description="RTO also trains the refusal token after the WHOLE harmful response (where a finished "
                          "answer has its end-of-turn token); false: only after its proper prefixes")
    safe_sentences: int | None = Field(
        None, ge=1, description="fine-tune refusals keep only their first N sentences (null: whole); unlike "
                                "data.synthetic.safe_style it leaves the corpus, tokenizer and base model unchanged")
    max_length: int = Field(512, ge=8)
    max_chars: int = Field(32_000, ge=1, description="longer text fields are quarantined")
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    refusal_string: str = "Sorry"
    probe_refusal_strings: list[str] = Field(default_factory=lambda: ["Sorry"])
    refusal_templates: list[str] = Field(default_factory=lambda: list(DEFAULT_REFUSALS))
    use_chat_template: bool = True
    plain_template: str = "### Instruction:\n{instruction}\n\n### Response:\n"
    system_prompt: str | None = None
    seed: int = 0
    tokenize_concurrency: int | None = Field(
        None, ge=1, description="most read+normalize+tokenize tasks at once; null: as many as Ray has CPUs")
    tokenize_batch_size: int = Field(256, ge=1)
    read_chunk_mb: float = Field(2.0, gt=0, description="local JSONL files are read in pieces of about this size, "
                                                        "one Ray task each")

    @field_validator("plain_template")
    @classmethod
    def _template_has_slot(cls, v: str) -> str:
        if "{instruction}" not in v:
            raise ValueError("plain_template must contain '{instruction}'")
        return v

    @field_validator("refusal_string")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("refusal_string must be non-empty, e.g. 'Sorry'")
        return v


# ---------------------------------------------------------------------------------------------- model
class TinyModelConfig(Strict):
    """The embedded default: a small random-init Llama plus a BPE tokenizer trained on the synthetic corpus."""

    vocab_size: int = Field(2048, ge=300)
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 512
    seed: int = 0
    mid_refusal_token: bool = Field(
        False, description="the tokenizer also gets ' ' + data.refusal_string as one token (data.mid_refusal_space)")


class LoraConfig(Strict):
    r: int = Field(16, ge=1)
    alpha: int = 32
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class ModelConfig(Strict):
    # "tiny" = the embedded default (built locally, never downloaded); else a local HF path or a hub id
    name_or_path: str = "tiny"
    tokenizer: str | None = None
    adapter: str | None = None  # a PEFT adapter to load on top (serve/eval)
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    tiny_dir: str = "~/.cache/derta/tiny"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    attn_implementation: str | None = "sdpa"


# ---------------------------------------------------------------------------------------------- train
class TrainConfig(Strict):
    output_dir: str = "runs/tiny"
    run_name: str = "derta"
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    gpu_memory_gb: float = Field(80.0, gt=0, description="memory of each GPU (GiB), for the --dry-run memory plan")
    resources_per_worker: dict[str, float] | None = None
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    strategy: Literal["ddp", "fsdp"] = "ddp"
    lora: LoraConfig | None = None
    merge_lora: bool = Field(False, description="LoRA: export OUTPUT/final merged into the base (an HF model) "
                                                "instead of a PEFT adapter")
    gradient_checkpointing: bool = False
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float | None = 1.0
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1, description="rows per worker per micro-batch")
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    mle_weight: float = Field(1.0, ge=0)
    rto_weight: float = Field(1.0, ge=0)
    loss_weighting: Literal["term_mean", "token_mean"] = Field(
        "term_mean", description="term_mean: mle_weight*mean(MLE CE) + rto_weight*mean(RTO CE); token_mean: one "
                                 "token mean over all supervised positions (the reference's); see derta/losses.py")
    rto_keep_fraction: float = Field(
        1.0, gt=0, le=1, description="share of RTO positions trained each step, drawn at random (reference: 8B full "
                                     "~0.05, 70B LoRA 1.0)")
    group_buffer_batches: int = Field(32, ge=1, description="batches sorted together for length grouping")
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    fault_at_step: int | None = Field(None, ge=1, description="test switch: crash rank 1 (or 0) once at step k")
    seed: int = 0
    torch_threads: int | None = None


# ---------------------------------------------------------------------------------------------- serve
class AutoscalingConfig(Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(4, gt=0)


class ServeConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    model_name: str = "derta"
    # name -> {model path, optional adapter}; requests may only name registry entries
    registry: dict[str, dict[str, str]] = Field(default_factory=dict)
    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingConfig | None = None
    max_replicas_per_node: int | None = Field(None, ge=1, description="spread replicas: 1 = one per node")
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 1})
    max_ongoing_requests: int = Field(16, ge=1)
    max_queued_requests: int = Field(64, ge=-1)
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    batch_fill_fraction: float = Field(0.25, ge=0, le=1, description=(
        "after a batch, hold new requests until its size is waiting again or this share of its duration (<= 0.5 s) "
        "has passed (serve/batch_gate.py); 0: the next batch starts with whatever is waiting"))
    continuous_batching: bool = Field(True, description=(
        "/generate and /v1 requests join the running batch between decoding steps and leave it when done "
        "(serve/scheduler.py); false: static batches of up to max_batch_size (@serve.batch + the batch gate)"))
    max_input_tokens: int = Field(1024, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    api_key: str | None = None  # or env DERTA_API_KEY
    insecure: bool = Field(False, description="allow serving without an API key on a non-loopback host")
    max_inflight_tokens: int | None = Field(
        None, ge=1, description="per-replica token budget (prompt + new tokens in flight); default "
                                "4 x max_batch_size x (max_input_tokens + max_new_tokens); beyond it: 503 + Retry-After")
    probe_threshold: float = Field(0.5, gt=0, lt=1)
    probe_verify_tokens: int = Field(16, ge=1)
    model_niceness: int = Field(
        0, ge=0, le=19, description="model replicas run this many nice levels below the process that started them, "
                                    "so Serve's proxy and the ingress (503s, health) preempt the forward passes on "
                                    "shared CPUs; 0 = same priority (10 cost /generate throughput in bench_serve.py)")
    direct_ingress: bool = Field(
        True, description="Ray Serve direct ingress behind HAProxy: the ingress replicas serve HTTP on their own "
                          "ports (from 30000) and HAProxy, not Serve's Python proxy, listens on the HTTP port "
                          "(`--port`) and forwards to them (overload 503s without the proxy hop). Read when Ray "
                          "starts (`derta serve` sets RAY_SERVE_ENABLE_DIRECT_INGRESS/RAY_SERVE_ENABLE_HA_PROXY for "
                          "the instance it starts; a cluster needs them in its environment); false: Serve's proxy")
    warmup_connections: int = Field(
        32, ge=0, description="`derta serve` sends this many concurrent GET /health through `--port` once the app "
                              "runs under serve.direct_ingress, so that HAProxy's connections to the ingress replica "
                              "and their first requests are paid before the first real burst; 0 = none")
    keep_alive_timeout_s: int = Field(
        600, ge=1, le=86400,
        description="Serve's http_options.keep_alive_timeout_s: how long the ingress replicas (and Serve's proxy) keep "
                    "an idle HTTP connection open, also HAProxy's client-side `timeout http-keep-alive`. Longer than "
                    "HAProxy keeps its idle pool to the replicas (at most ~9 of serve/haproxy_503.sh's 60 s "
                    "pool-purge-delays), so HAProxy, not the replica, decides when a pooled connection closes (Ray's "
                    "default, 90, closed the warm pool after 90 s of quiet: bench/README.md)")


# ----------------------------------------------------------------------------------------------- eval
class EvalConfig(Strict):
    suites: list[str] = Field(default_factory=lambda: ["synthetic_prefill", "synthetic_helpful"])
    data_dir: str | None = None
    prefill_ks: list[int] = Field(default_factory=lambda: [0, 5, 10, 20, 40])
    max_new_tokens: int = Field(48, ge=1)
    batch_size: int = Field(32, ge=1)
    concurrency: int = Field(1, ge=1)
    limit: int | None = Field(None, ge=1)
    judge: Literal["rules", "endpoint", "hf", "classifier"] = "rules"  # see derta/judge_models.py
    judge_style: Literal["derta", "llamaguard", "harmbench"] = "derta"  # prompt + reply parser of model judges
    judge_api: Literal["chat", "completions"] = "chat"                  # endpoint judge: which /v1 route
    judge_url: str | None = None
    judge_model: str | None = None
    judge_hf_path: str | None = None                                    # hf judge: local causal-LM guard dir
    judge_classifier: str | None = None
    judge_benign: bool = False              # model judges also decide refusals on benign (over-refusal) items
    judge_max_fallback_rate: float = Field(0.05, ge=0.0, le=1.0)  # fail the run above this per-suite rate
    seed: int = 0
    heldout_split: Literal["all", "dev", "test"] = Field(
        "all", description="synthetic held-out suites: all rows, or the dev (tuning) / test (reporting) half")
    torch_threads: int | None = Field(None, ge=1, description="torch threads per generator (fixed: same numbers "
                                                              "on any machine)")


# ----------------------------------------------------------------------------------------- experiment
class ExperimentConfig(Strict):
    """`derta experiment`: pre-train a base from random init, then fine-tune it three ways (vanilla, recaug,
    derta). Unset fields fall back to the `train` section, which supplies everything else (batch size, workers)."""
    base_epochs: int | None = Field(None, ge=1, description="base pre-training passes (default train.epochs)")
    base_lr: float | None = Field(None, gt=0, description="base pre-training lr (default train.lr)")
    finetune_steps: int | None = Field(
        None, ge=1, description="steps of every fine-tune (default train.max_steps, else vanilla's epoch count)")
    finetune_lr: float | None = Field(None, gt=0, description="fine-tune lr (default train.lr)")
    seeds: int = Field(3, ge=1, description="independent repetitions (model init, data order); mean + 95% interval")
    first_seed: int = Field(0, ge=0, description="seed of the first repetition (train.seed, model.tiny.seed)")
    shared_base: bool = Field(True, description="pre-train the base once (with base_seed) and fine-tune it per "
                                                "seed, as the paper does; false: a base per seed")
    base_seed: int = Field(0, ge=0, description="seed of the shared base (independent of first_seed, so that "
                                                "seeds run separately share it)")


class DertaConfig(Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)
    base: str | None = Field(None, description="another preset this one extends")

    @model_validator(mode="after")
    def _lengths_fit_model(self) -> "DertaConfig":
        if self.model.name_or_path == "tiny" and self.data.max_length > self.model.tiny.max_position_embeddings:
            raise ValueError(
                f"data.max_length={self.data.max_length} exceeds model.tiny.max_position_embeddings="
                f"{self.model.tiny.max_position_embeddings}")
        return self


# ---------------------------------------------------------------------------------------------- loading
def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(item: str) -> dict:
    """`train.lr=1e-4` -> {"train": {"lr": 1e-4}}; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    nested: dict = {}
    cursor = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def _yaml_line(path: Path, loc: tuple) -> int | None:
    """Line (1-based) of the YAML key at `loc`, or None when the key is not in the file."""
    try:
        node = yaml.compose(path.read_text())
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(part)]
            if not match:
                break
            key, node = match[0]
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (data, model, train, ...)")
    return data


def resolve_preset(name_or_path: str | Path) -> Path:
    """A path, or a preset name from configs/ (`tiny` -> configs/tiny.yaml)."""
    path = Path(name_or_path)
    if path.is_file() or path.suffix in (".yaml", ".yml"):
        return path
    return CONFIG_DIR / f"{name_or_path}.yaml"


def _load_layers(path: Path, seen: tuple = ()) -> tuple[dict, list[Path]]:
    if path.resolve() in seen:
        raise ConfigError(f"{path}: circular 'base' chain")
    data = _read_yaml(path)
    files = [path]
    if data.get("base"):
        base_path = resolve_preset(data["base"])
        if not base_path.is_absolute() and not base_path.exists():
            base_path = path.parent / data["base"]
        base_data, base_files = _load_layers(base_path, seen + (path.resolve(),))
        data = _deep_merge(base_data, {k: v for k, v in data.items() if k != "base"})
        files = base_files + files
    return data, files


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DertaConfig:
    """Load a preset/YAML file (or the defaults), apply `key=value` overrides, validate."""
    data: dict = {}
    files: list[Path] = []
    if path is not None:
        data, files = _load_layers(resolve_preset(path))
    for item in overrides or []:
        data = _deep_merge(data, parse_override(item))
    data.pop("base", None)
    try:
        return DertaConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, files, overrides or [])) from None


def _describe(err: ValidationError, files: list[Path], overrides: list[str]) -> str:
    lines = ["invalid config:"]
    for problem in err.errors():
        loc = tuple(problem["loc"])
        field = ".".join(str(p) for p in loc) or "<root>"
        where = ""
        if any(field.startswith(o.split("=", 1)[0].strip()) for o in overrides):
            where = "--set: "
        for file in reversed(files if not where else []):
            line = _yaml_line(file, loc)
            if line:
                where = f"{file}:{line}: "
                break
        lines.append(f"  {where}{field}: {problem['msg']} (got {problem.get('input')!r})")
    return "\n".join(lines)


def dump_config(config: DertaConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
