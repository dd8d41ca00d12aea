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
