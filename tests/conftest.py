"""Shared fixtures: one tiny model build and ONE Ray instance for the whole session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("DERTA_SHARED_DATA", REPO.parent / "shared" / "data"))
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
# the suite never attaches to a Ray cluster it did not start (someone's `ray start --head`, an exported RAY_ADDRESS)
os.environ["DERTA_RAY_REUSE"] = "0"
os.environ.pop("RAY_ADDRESS", None)


def shared_file(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set DERTA_SHARED_DATA to the shared/data directory)")
    return path


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory):
    from derta.config import load_config

    tiny_dir = tmp_path_factory.mktemp("tiny")
    return load_config("tiny", [f"model.tiny_dir={tiny_dir}"])


@pytest.fixture(scope="session")
def tiny_path(tiny_config) -> str:
    from derta.modeling import resolve_model_path

    return resolve_model_path(tiny_config.model, tiny_config.data.synthetic, tiny_config.data.refusal_string)


@pytest.fixture(scope="session")
def tokenizer(tiny_path):
    from derta.modeling import load_tokenizer

    return load_tokenizer(tiny_path)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for all tests that need it (2 cores: 4 logical CPUs lets 2 train workers +
    a Ray Data stage share the machine without deadlocking on resources)."""
    import ray

    from derta.runtime import init_ray, quiet_data

    if not ray.is_initialized():
        init_ray(num_cpus=4)
    quiet_data()
    yield ray
    ray.shutdown()


# What derta sets for a Ray Serve instance it starts (serve/app.py set_serve_process_env: Serve's mode, HAProxy's
# binary and ports): `derta serve` keeps them for its own process, a test must not. A leaked one made later tests
# depend on the order they ran in (a HAProxy binary chosen by an earlier test); tests/serve_utils.py
# `restored_environ` is what in-process Serve starts use.
SERVE_ENV_PREFIXES = ("RAY_SERVE_", "DERTA_HAPROXY_", "DERTA_CHOSEN_PORTS")


def serve_environ() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key.startswith(SERVE_ENV_PREFIXES)}


@pytest.fixture(scope="module", autouse=True)
def no_serve_env_leak(request):
    """Fails the module (an error at its teardown) that leaves a Serve/HAProxy variable set or changed, after
    putting them back so that later modules still start clean."""
    before = serve_environ()
    yield
    after = serve_environ()
    changed = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
    for key in changed:
        if key in before:
            os.environ[key] = before[key]
        else:
            del os.environ[key]
    if changed:
        pytest.fail(f"{request.module.__name__} left Serve's environment changed: "
                    + ", ".join(f"{key}={after.get(key)!r} (was {before.get(key)!r})" for key in changed)
                    + "; wrap in-process Serve starts in tests/serve_utils.py restored_environ()", pytrace=False)
