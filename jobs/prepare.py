"""Ray job entrypoint for data preparation: same arguments as `derta data prepare`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from derta.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["data", "prepare", *sys.argv[1:]])
