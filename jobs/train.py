"""Ray job entrypoint for DeRTa training.

    ray job submit --working-dir . -- python jobs/train.py --config configs/tiny.yaml --output /shared/runs/x
Same arguments as `derta train`; connects to the cluster the job runs on (RAY_ADDRESS is set by Ray).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # working-dir uploads: import derta from the repo

from derta.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["train", *sys.argv[1:]])
