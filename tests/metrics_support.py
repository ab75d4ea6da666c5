"""What the metrics tests share: the CLI, free ports, the text format read back."""

from __future__ import annotations

import socket
import subprocess
import sys

from prometheus_client.parser import text_string_to_metric_families


def poolkeeper(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "poolkeeper", *args], capture_output=True, text=True, timeout=60
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now on `host` (the kernel's choice; nothing else here binds ports at
    random, so it stays free until the test binds it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, its labels) -> value, for every sample of the text format; raises
    ValueError on text that is not the format (a partial file, say)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def daemon_metrics(config) -> str:
    """`poolkeeper metrics -c CONFIG`: its output, which must have succeeded."""
    done = poolkeeper("metrics", "-c", str(config))
    assert done.returncode == 0, done.stderr
    return done.stdout


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["promtool", *args], input=stdin, capture_output=True, text=True, timeout=60
    )
