"""Ray job entrypoint for evaluation: same arguments as `derta eval`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from derta.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["eval", *sys.argv[1:]])
