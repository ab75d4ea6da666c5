"""Durations ('500ms', '30s', '1h30m') and sizes ('512MiB', '1GB') as written in the job spec.

Decisions (see docs/config.md): a duration is one or more `<number><unit>` parts with units
ms, s, m, h, d (`1.5h`, `1h30m`, `2m30s`), no spaces; a bare number is refused because `30`
could mean seconds or minutes. A size is `<number><unit>` with decimal (kB, MB, GB, TB) or binary
(KiB, MiB, GiB, TiB; K, M, G, T as in systemd) units, `B` for bytes, or `0` for "no limit".
"""

from __future__ import annotations

import math
import re

DURATION_UNITS: dict[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Threading waits overflow near 2**63 ns; a longer duration is always a typo.
MAX_DURATION = 3650 * 86400.0

_NUMBER = r"(?:\d+(?:\.\d+)?|\.\d+)"
_PART = re.compile(rf"({_NUMBER})(ms|s|m|h|d)")
DURATION_PATTERN = rf"^(?:{_NUMBER}(?:ms|s|m|h|d))+$"
_DURATION_RE = re.compile(DURATION_PATTERN)

SIZE_UNITS: dict[str, int] = {
    "B": 1,
    "kB": 1000, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
    "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4,
    "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4,
}  # fmt: skip
SIZE_PATTERN = rf"^(?:0|{_NUMBER}(?:{'|'.join(sorted(SIZE_UNITS, key=len, reverse=True))}))$"
_SIZE_RE = re.compile(rf"({_NUMBER})({'|'.join(sorted(SIZE_UNITS, key=len, reverse=True))})")


def parse_duration(text: str) -> float:
    """'1h30m' -> 5400.0 seconds. Raises ValueError with a message fit for a user."""
    if not isinstance(text, str):
        raise ValueError(f"a duration must be a string like '30s', not {type(text).__name__}")
    if not _DURATION_RE.fullmatch(text):
        stripped = text.strip()
        if re.fullmatch(_NUMBER, stripped):
            raise ValueError(f"a duration needs a unit, e.g. '{stripped}s'")
        units = ", ".join(DURATION_UNITS)
        raise ValueError(
            f"'{text}' is not a duration; write e.g. '500ms', '30s', '5m', '1h30m' (units: {units})"
        )
    seconds = sum(float(num) * DURATION_UNITS[unit] for num, unit in _PART.findall(text))
    if seconds > MAX_DURATION:
        raise ValueError(f"'{text}' is longer than the maximum of 3650d (10 years)")
    return seconds


def format_duration(seconds: float) -> str:
    """5400 -> '1h30m', 0.5 -> '500ms', 90.25 -> '1m30.25s'. parse_duration() reads it back."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"cannot format {seconds!r} as a duration")
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{_trim(seconds * 1000)}ms"
    parts = []
    rest = seconds
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        whole = int(rest // size)
        if whole:
            parts.append(f"{whole}{unit}")
            rest -= whole * size
    rest = round(rest, 6)
    if rest:
        parts.append(f"{_trim(rest)}s")
    return "".join(parts) or "0s"


def parse_size(text: str | int) -> int:
    """'512MiB' -> 536870912 bytes; '0' or 0 -> 0. Raises ValueError with a user message."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text == 0:
            return 0
        raise ValueError(f"a size needs a unit, e.g. '{text}MiB' (or 0 for no limit)")
    if not isinstance(text, str):
        raise ValueError(f"a size must be a string like '512MiB', not {type(text).__name__}")
    if text == "0":
        return 0
    match = _SIZE_RE.fullmatch(text)
    if not match:
        stripped = text.strip()
        if re.fullmatch(_NUMBER, stripped):
            raise ValueError(f"a size needs a unit, e.g. '{stripped}MiB' (or 0 for no limit)")
        raise ValueError(
            f"'{text}' is not a size; write e.g. '512MiB', '1GiB', '100MB' or 0 for no limit"
        )
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


def format_size(size: int) -> str:
    """536870912 -> '512MiB'; sizes that are not whole binary units come out in bytes."""
    if size == 0:
        return "0"
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if size % SIZE_UNITS[unit] == 0:
            return f"{size // SIZE_UNITS[unit]}{unit}"
    return f"{size}B"


def _trim(number: float) -> str:
    """1.50 -> '1.5', 2.0 -> '2': no exponent, no trailing zeros."""
    text = f"{number:.6f}".rstrip("0").rstrip(".")
    return text or "0"
