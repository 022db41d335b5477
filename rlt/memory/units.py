"""Byte units, dtype sizes and size strings of the memory estimate ("GB" = 10^9 bytes, "GiB" = 2^30)."""

from __future__ import annotations

import re

GB = 10**9
GiB = 2**30

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int | float) -> int:
    """'85GB' → 85·10^9 bytes, '85GiB' → 85·2^30, '512MiB', '1.5TB'. A bare number is refused (which unit?).

    Raises:
        ValueError: with a message that says what to write.
    """
    raw = str(text)
    m = _SIZE_RE.match(raw)
    if not m:
        raise ValueError(f"cannot read the size {raw!r}: write a number and a unit, e.g. 85GB (10^9 bytes) or "
                         f"80GiB (2^30 bytes)")
    number, unit = m.groups()
    if unit is None:
        raise ValueError(f"the size {raw!r} has no unit: write {raw.strip()}GB (10^9 bytes) or {raw.strip()}GiB "
                         f"(2^30 bytes)")
    return int(round(float(number) * _UNITS[unit.lower()]))


def format_bytes(n: int, unit: str = "GB") -> str:
    """Bytes in GB (10^9) or GiB (2^30) with two decimals, e.g. 15,231,233,024 → '15.23 GB'."""
    div = GB if unit == "GB" else GiB
    return f"{n / div:.2f} {unit}"
