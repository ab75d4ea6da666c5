"""Run every benchmark in bench/ and print their tables (`make bench`). Not a test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
BENCHES = ["bench_pool.py", "bench_daemon.py", "bench_systemd.py"]


def main() -> int:
    failed = 0
    for name in BENCHES:
        print(f"\n## {name}\n", flush=True)
        failed += (
            subprocess.run([sys.executable, str(HERE / name)], cwd=HERE.parent).returncode != 0
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
