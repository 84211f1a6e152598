"""The machine a benchmark ran on, for the header of its results (every bench/ script uses it),
and the scripts' argument types."""

from __future__ import annotations

import argparse
import platform
import subprocess


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (--repeats 0 ended in statistics.median's bare error)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
    return value


def cpu_model() -> str:
    """The CPU as ``lscpu`` reports it: model name, family/model and whether it has AVX-512.

    Virtual machines often report a bare "AMD EPYC"; the family and model numbers tell the
    generation (AMD family 25 = Zen 3/Zen 4, 26 = Zen 5), which matters here: the sampler's AVX-512
    kernels run 512-bit operations at full width on Zen 5 and as two halves on Zen 4.
    (``platform.processor()`` when lscpu is missing.)
    """
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or "unknown CPU"
    fields = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    name = fields.get("Model name") or platform.processor() or "unknown CPU"
    details = []
    if "CPU family" in fields and "Model" in fields:
        details.append(f"family {fields['CPU family']}, model {fields['Model']}")
    if "Flags" in fields:
        details.append("AVX-512" if "avx512f" in fields["Flags"].split() else "no AVX-512")
    return f"{name} ({'; '.join(details)})" if details else name
