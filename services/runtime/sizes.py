"""Human memory sizes ("512MiB", "8GiB", "1.5G", "4096") <-> bytes. Pure."""

from __future__ import annotations

import re

# Binary and decimal units; a bare number is bytes. "G" alone is taken as GiB (like `docker -m`).
_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes in `text`; ValueError naming the accepted forms when it is not a positive size."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"invalid size {text!r}: expected a number with an optional unit, e.g. 512MiB, 8GiB, 1.5G")
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        units = ", ".join(u for u in ("KiB", "MiB", "GiB", "TiB", "KB", "MB", "GB", "TB"))
        raise ValueError(f"invalid size {text!r}: unknown unit {unit!r} (use one of {units})")
    num_bytes = int(float(number) * factor)
    if num_bytes <= 0:
        raise ValueError(f"invalid size {text!r}: must be greater than zero")
    return num_bytes


def format_size(num_bytes: int) -> str:
    """The largest binary unit that keeps the number >= 1: 536870912 -> '512MiB'."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= factor:
            value = num_bytes / factor
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return f"{num_bytes}B"


def size_arg(text: str) -> str:
    """argparse `type=`: validate, keep the user's spelling (it is passed on to `kvmesh memserver`)."""
    import argparse

    try:
        parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return text
