"""Checks that a config will work with the tokenizer (and model config) it will actually run with, before
anything expensive starts. `derta train --dry-run` prints this report; `derta train/serve/eval` run
`check_tokens` at start so a bad refusal string is a config error naming the field, never a Serve replica that
never becomes healthy.

Refusal-token rule (the RTO target and the probe):
- each string stands for its FIRST token as tokenized at the start of a response;
- that token must be distinctive: a single-character first token ("I" of "I cannot", on every real tokenizer)
  also starts ordinary answers ("I think..."), so the RTO target would teach, and the probe would measure, "I"
  rather than a refusal. Such a string is a config error naming the field; use strings whose first token is a
  whole refusal word ("Sorry", "Unfortunately");
- probe strings that share a first token count once (deduplicated, order kept).
Refusal templates should start with the refusal token (their first token is what harmful-prefix rows teach);
those that do not are reported as warnings here and counted in stats.json.
"""
from __future__ import annotations

from pathlib import Path

from derta.config import ConfigError, DertaConfig


def _token_error(field: str, value: str, err: Exception) -> ConfigError:
    return ConfigError(f"{field}={value!r}: {err}")


def check_tokens(cfg: DertaConfig, tokenizer) -> dict:
    """Validate refusal/probe strings and derive end-of-turn/BOS facts for `tokenizer`; raises ConfigError naming
    the field. Returns a JSON-able report."""
    from derta.tokens import adds_bos, end_of_turn_id, stop_token_ids
    from derta.transforms import PromptRenderer, RefusalTokenError, refusal_token_id

    data = cfg.data
    try:
        refusal_id = refusal_token_id(tokenizer, data.refusal_string)
    except RefusalTokenError as err:
        raise _token_error("data.refusal_string", data.refusal_string, err) from None
    probe_ids: list[int] = []
    for i, text in enumerate(data.probe_refusal_strings):
        try:
            token = refusal_token_id(tokenizer, text)
        except RefusalTokenError as err:
            raise _token_error(f"data.probe_refusal_strings[{i}]", text, err) from None
        probe_ids.append(token) if token not in probe_ids else None
    if not probe_ids:
        raise ConfigError("data.probe_refusal_strings is empty; the probe needs at least one string, e.g. ['Sorry']")
    first_tokens = [tokenizer.encode(t, add_special_tokens=False)[:1] for t in data.refusal_templates]
    off_templates = [i for i, ids in enumerate(first_tokens) if ids != [refusal_id]]
    renderer = PromptRenderer(tokenizer, data.use_chat_template, data.plain_template, data.system_prompt)
    try:
        prompt_ids = renderer.encode_prompt(renderer.render("Hello"))
    except Exception as err:  # noqa: BLE001 - a template that cannot render one user turn
        raise ConfigError(f"data.use_chat_template: the tokenizer's chat template cannot render a user turn ({err})")
    eot = end_of_turn_id(tokenizer, renderer.use_chat)
    decode = lambda ids: [tokenizer.decode([i]) for i in ids]  # noqa: E731
    warnings = [f"data.refusal_templates[{i}] does not start with the refusal token {tokenizer.decode([refusal_id])!r}"
                for i in off_templates]
    return {
        "refusal_token": {"string": data.refusal_string, "id": refusal_id, "token": tokenizer.decode([refusal_id])},
        "probe_tokens": {"ids": probe_ids, "tokens": decode(probe_ids)},
        "refusal_templates_not_starting_with_refusal": len(off_templates),
        "chat_template": renderer.use_chat,
        "end_of_turn": {"id": eot, "token": tokenizer.decode([eot])},
        "stop_tokens": {"ids": stop_token_ids(tokenizer), "tokens": decode(stop_token_ids(tokenizer))},
        "bos": {"token": tokenizer.bos_token, "added": adds_bos(tokenizer),
                "in_rendered_prompt": sum(1 for i in prompt_ids if i == tokenizer.bos_token_id)
                if tokenizer.bos_token_id is not None else 0},
        "prompt_tokens_example": len(prompt_ids),
        "warnings": warnings,
    }


def _model_context(model_path: str) -> int | None:
    config_file = Path(model_path) / "config.json"
    if not config_file.exists():
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "max_position_embeddings", None)


def check_lengths(cfg: DertaConfig, model_path: str) -> dict:
    """data.max_length and the serve limits against the model's context (when its config.json is at hand)."""
    context = _model_context(model_path)
    report = {"max_length": cfg.data.max_length, "model_context": context}
    if context is None:
        report["note"] = "no local config.json: context length not checked"
        return report
    if cfg.data.max_length > context:
        raise ConfigError(f"data.max_length={cfg.data.max_length} exceeds the model's context "
                          f"(max_position_embeddings={context} in {model_path}/config.json)")
    return report


def load_run_tokenizer(cfg: DertaConfig, model_path: str):
    from derta.modeling import load_tokenizer

    source = cfg.model.tokenizer or model_path
    try:
        return load_tokenizer(source, cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.tokenizer / model.name_or_path={source!r}: cannot load a tokenizer ({err})") from None


def run_preflight(cfg: DertaConfig) -> dict:
    """Everything `derta train --dry-run` checks without training: config, model path, tokenizer, refusal and probe
    strings, end of turn, BOS, lengths. Raises ConfigError on the first problem; returns the report."""
    from derta.modeling import resolve_model_path

    model_path = resolve_model_path(cfg.model, cfg.data.synthetic, cfg.data.refusal_string)
    tokenizer = load_run_tokenizer(cfg, model_path)
    return {"model": model_path, "tokenizer": cfg.model.tokenizer or model_path, "mode": cfg.data.mode,
            "tokens": check_tokens(cfg, tokenizer), "lengths": check_lengths(cfg, model_path)}


def _block_refusal_starts(table, refusal_id: int):
    import pyarrow as pa
    import pyarrow.compute as pc

    from derta.plain_parquet import int32_lists

    starts = others = 0
    if table.num_rows and "kind" in table.column_names:
        rows = table.filter(pc.equal(table.column("kind"), "harmful_prefix"))
        for labels in int32_lists(rows.column("labels")).to_pylist():
            first = next((label for label in labels if label != -100), None)
            starts, others = (starts + 1, others) if first == refusal_id else (starts, others + 1)
    return pa.table({"starts": [starts], "others": [others]})


def refusal_start_counts(dataset, refusal_id: int) -> dict:
    """How many harmful-prefix examples' safe responses start with the refusal token (what RTO trains) and how many
    do not (a refusal template or corpus `safe_response` that opens differently): one counting task per block."""
    counts = dataset.map_batches(_block_refusal_starts, fn_kwargs={"refusal_id": refusal_id}, batch_format="pyarrow",
                                 batch_size=None).sum(["starts", "others"]) or {}
    return {"starts_with_refusal_token": int(counts.get("sum(starts)") or 0),
            "does_not": int(counts.get("sum(others)") or 0)}
