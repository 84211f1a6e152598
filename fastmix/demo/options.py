"""The demo's settings, importable without torch (so ``fastmix demo --help`` stays fast)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["VOCAB_SIZE", "GPTConfig", "DemoOptions", "QUICK", "usable_cpus"]

VOCAB_SIZE = 257  # fastmix prepare's byte tokenizer: 256 byte values + end-of-document
MAX_SEED = 2**64 - 3  # seed + 2 must stay a valid (64-bit) sampler and torch seed
# Least bytes of each domain's train and held-out parts (the corpus builder's CorpusSpec checks).
MIN_TRAIN_BYTES = 4096
MIN_HELDOUT_BYTES = 1024
N_DOMAINS = 5  # code, prose, math, data, noise (fastmix.demo.corpus.DOMAINS)
# DemoOptions field -> the demo's flag, so that an error names what the user typed.
_FLAGS = {"n_layers": "--layers", "n_heads": "--heads"}


def _flag(name: str) -> str:
    """``name (--flag)`` for a DemoOptions field."""
    return f"{name} ({_FLAGS.get(name, '--' + name.replace('_', '-'))})"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the model; ``seq_len`` bounds the learned position table."""

    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    seq_len: int = 128
    vocab_size: int = VOCAB_SIZE

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "seq_len", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})"
            )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def num_parameters(self) -> int:
        """Parameters of the TinyGPT of this shape (computed: the model is never built)."""
        d = self.d_model
        block = 12 * d * d + 13 * d  # qkv, proj, fc, out (weights and biases), two LayerNorms
        return (self.vocab_size + self.seq_len) * d + self.n_layers * block + 2 * d


@dataclass(frozen=True)
class DemoOptions:
    """Every knob of the demo.  ``main_*`` default to the proxy's shape."""

    out: Path = Path("fastmix-demo")
    seed: int = 0
    steps: int = 800
    main_steps: int | None = None
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    main_d_model: int | None = None
    main_layers: int | None = None
    main_heads: int | None = None
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 2e-3
    step_size: float = 1.0
    smoothing: float = 1e-3
    proxy_loss: str = "dro"
    resample: bool = False
    sampler: str = "alias"
    weights: Path | None = None
    train_bytes: int = 1_000_000
    heldout_bytes: int = 50_000
    eval_windows: int = 256
    device: str | None = None
    threads: int | None = None
    progress: bool = True
    rebuild: bool = False
    quick: bool = False

    def __post_init__(self) -> None:
        flag = _flag
        positive = (
            "steps", "d_model", "n_layers", "n_heads", "seq_len", "batch_size", "eval_windows"
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{flag(name)} must be a positive integer, got {value!r}")
        for name in ("main_steps", "main_d_model", "main_layers", "main_heads", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{flag(name)} must be a positive integer, got {value!r}")
        # torch.set_num_threads takes any count, but OpenMP then fails to create the threads:
        # 8192 hung, 32768 and 100000 crashed the process (SIGSEGV), with no message naming a flag.
        if self.threads is not None and self.threads > usable_cpus():
            raise ValueError(f"threads (--threads) must be at most {usable_cpus()}, the CPUs this "
                             f"process may use, got {self.threads}")
        for name in ("lr", "step_size"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{flag(name)} must be a positive finite number, got {value!r}")
        if not (0.0 <= self.smoothing < 1.0):
            raise ValueError(f"{flag('smoothing')} must be in [0, 1), got {self.smoothing!r}")
        if self.proxy_loss not in ("dro", "reweighted"):
            raise ValueError(f"{flag('proxy_loss')} must be 'dro' or 'reweighted', got "
                             f"{self.proxy_loss!r}")
        # The runs use seed, seed + 1 and seed + 2, and MixtureDataset takes seeds below 2**64.
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) \
                or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed (--seed) must be an integer in [0, 2**64 - 3], got "
                             f"{self.seed!r}")
        # The corpus's own bounds (CorpusSpec), checked here too so that they name the flags and
        # come before the output folder is created and torch is imported.
        for name, least in (("train_bytes", MIN_TRAIN_BYTES), ("heldout_bytes", MIN_HELDOUT_BYTES)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{flag(name)} must be an integer of at least {least}, got "
                                 f"{value!r}")
        if self.heldout_bytes < (self.seq_len + 1) * 4:
            raise ValueError(
                f"{flag('heldout_bytes')} ({self.heldout_bytes}) must hold at least 4 windows of "
                f"seq_len + 1 = {self.seq_len + 1} bytes (--seq-len {self.seq_len})"
            )
        # Checked here to name the flags: GPTConfig only knows its own field names.
        shapes = (
            ("", self.d_model, "--d-model", self.n_heads, "--heads"),
            ("main models: ", self.main_d_model or self.d_model,
             "--main-d-model" if self.main_d_model else "--d-model",
             self.main_heads or self.n_heads,
             "--main-heads" if self.main_heads else "--heads"),
        )
        for label, d_model, d_flag, heads, h_flag in shapes:
            if d_model % heads:
                raise ValueError(f"{label}d_model {d_model} ({d_flag}) must be a multiple of "
                                 f"n_heads {heads} ({h_flag})")
        GPTConfig(self.d_model, self.n_layers, self.n_heads, self.seq_len)  # checks the shape
        self.main_config()
        self._check_fits()

    def _check_fits(self) -> None:
        """ValueError naming the flags when a size is more than this machine can allocate.

        Without it, --steps 10**12 or --d-model 10**8 ended in an allocator's RuntimeError
        traceback after the corpus was built, and --layers 10**9 ran out of memory building
        the model.  Only what is surely needed on the host is probed: the model's weights (built
        on the CPU, whatever the device) and every step's records (the loss, and α and the excess
        loss of each domain, as float32).
        """
        from fastmix._checks import allocatable  # (numpy: imported on first use here)

        main_layers = "--main-layers" if self.main_layers else "--layers"
        main_width = "--main-d-model" if self.main_d_model else "--d-model"
        proxy, main = self.proxy_config(), self.main_config()
        needs = (
            (proxy.num_parameters * 4,
             f"the reference and proxy models' {proxy.num_parameters:,} parameters (--d-model "
             f"{self.d_model}, --layers {self.n_layers})"),
            (main.num_parameters * 4,
             f"the main models' {main.num_parameters:,} parameters ({main_width} "
             f"{main.d_model}, {main_layers} {main.n_layers})"),
            (self.steps * (1 + 2 * N_DOMAINS) * 4,
             f"the records of {self.steps:,} proxy steps (--steps)"),
            (self.total_main_steps * 4,
             f"the records of {self.total_main_steps:,} main-model steps "
             f"({'--main-steps' if self.main_steps else '--steps'})"),
        )
        for nbytes, what in needs:
            if not allocatable(nbytes):
                raise ValueError(f"{what} need {nbytes / 2**30:,.1f} GiB, more than can be "
                                 "allocated here")

    def proxy_config(self, vocab_size: int = VOCAB_SIZE) -> GPTConfig:
        """Shape of the reference and proxy models."""
        return GPTConfig(self.d_model, self.n_layers, self.n_heads, self.seq_len, vocab_size)

    def main_config(self, vocab_size: int = VOCAB_SIZE) -> GPTConfig:
        """Shape of the two main models."""
        return GPTConfig(
            self.main_d_model or self.d_model,
            self.main_layers or self.n_layers,
            self.main_heads or self.n_heads,
            self.seq_len,
            vocab_size,
        )

    @property
    def total_main_steps(self) -> int:
        return self.main_steps or self.steps


# --quick: smaller models, shorter windows, fewer steps (same corpus, so the cache is shared);
# explicit flags override it.
QUICK: dict[str, Any] = {
    "steps": 225,
    "d_model": 96,
    "n_layers": 2,
    "n_heads": 4,
    "seq_len": 96,
    "batch_size": 16,
    "lr": 3e-3,
    "eval_windows": 128,
}
