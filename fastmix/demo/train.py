"""Training and evaluation loops of the demo: a plain LM step, the DoReMi proxy step, held-out loss.

The loops read batches ``{"input_ids": [B, T + 1], "domain": [B]}`` from an iterator (a
:class:`fastmix.MixtureDataset`), keep every per-step record on the device and copy it to the host
once per stage (and every few steps for the progress bar), so a GPU is not stalled every step.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fastmix.demo.model import TinyGPT

# Progress bars refresh their loss read-out this often (one host sync each time).
_POSTFIX_EVERY = 25


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule: AdamW, linear warm-up, cosine decay to ``min_lr_ratio``·lr."""

    steps: int
    lr: float = 2e-3
    warmup_steps: int | None = None  # default: 10% of the steps, at most 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")

    @property
    def warmup(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(100, max(1, self.steps // 10))

    def lr_at(self, step: int) -> float:
        """Learning rate of (0-based) ``step``."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)


def pick_device(name: str | None = None) -> torch.device:
    """``name`` if given (checked), else CUDA when available, else the CPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device: {name!r} is not a torch device ({exc})") from None
    if device.type not in ("cpu", "cuda"):  # the demo's kernels and checks are for these two
        raise ValueError(f"device: {name!r}: the demo runs on 'cpu' or 'cuda' devices")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available")
    return device


@contextlib.contextmanager
def deterministic_torch(
    seed: int, device: torch.device, threads: int | None = None
) -> Iterator[None]:
    """Seed torch, ask for deterministic kernels where that costs little, set the CPU threads.

    Everything is restored on exit (the global RNG state included), so a caller in the same
    process, e.g. a test suite, is left as it was.
    """
    # cuBLAS needs this set before its first use to be deterministic.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_num_threads(),
        torch.backends.cudnn.benchmark,
    )
    devices = [device.index or 0] if device.type == "cuda" else []
    # Only what was applied is undone: Ctrl-C inside the first use_deterministic_algorithms
    # (which imports torch._inductor) left torch half-imported, and calling it again to restore
    # ended in an AttributeError traceback that hid the KeyboardInterrupt.
    undo: list[Callable[[], None]] = []
    with torch.random.fork_rng(devices=devices):
        try:
            torch.manual_seed(seed)
            # warn_only: an op without a deterministic kernel warns instead of failing the demo.
            torch.use_deterministic_algorithms(True, warn_only=True)
            undo.append(lambda: torch.use_deterministic_algorithms(saved[0], warn_only=saved[1]))
            torch.backends.cudnn.benchmark = False
            undo.append(lambda: setattr(torch.backends.cudnn, "benchmark", saved[3]))
            if threads is not None:
                torch.set_num_threads(threads)
                undo.append(lambda: torch.set_num_threads(saved[2]))
            yield
        except BaseException:
            for step in reversed(undo):
                try:
                    step()
                except Exception:  # noqa: BLE001, S110 - the exception on its way out matters
                    pass
            raise
        else:
            for step in reversed(undo):
                step()


def new_model(cfg: Any, seed: int, device: torch.device) -> TinyGPT:
    """A freshly initialised model; the init depends only on ``seed`` and ``cfg``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyGPT(cfg)
    return model.to(device)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases, norms and embeddings (the usual GPT recipe).
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "tok" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "tok" not in n)]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def _to_device(batch: Mapping[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.as_tensor(batch["input_ids"])
    domain = torch.as_tensor(batch["domain"])
    if tokens.dim() == 1:  # an unbatched sample
        tokens, domain = tokens[None], domain.reshape(1)
    return tokens.to(device, non_blocking=True), domain.to(device, non_blocking=True)


def _bar(total: int, desc: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=True)


def train_lm(
    model: TinyGPT,
    batches: Iterable[Mapping[str, Any]],
    cfg: TrainConfig,
    *,
    desc: str = "train",
    progress: bool = True,
) -> np.ndarray:
    """Train ``model`` on ``cfg.steps`` batches with the mean next-token loss.

    Returns the per-step training loss (nats per byte), shape ``[steps]``.
    """
    device = next(model.parameters()).device
    opt = _optimizer(model, cfg)
    losses = torch.zeros(cfg.steps, device=device)
    model.train()
    it = iter(batches)
    with _bar(cfg.steps, desc, progress) as bar:
        for step in range(cfg.steps):
            tokens, _ = _to_device(next(it), device)
            for group in opt.param_groups:
                group["lr"] = cfg.lr_at(step)
            loss = model(tokens).mean()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[step] = loss.detach()
            bar.update(1)
            if progress and (step + 1) % _POSTFIX_EVERY == 0:
                bar.set_postfix(loss=f"{losses[step].item():.3f}")
    model.eval()
    return losses.cpu().numpy()


@dataclass
class ProxyResult:
    """What the proxy run leaves: α after every update and the running average the main run uses."""

    trajectory: np.ndarray  # [steps + 1, K]: α before the first update, then after each
    average_weights: np.ndarray  # [K]
    final_weights: np.ndarray  # [K]
    excess: np.ndarray  # [steps, K]: λ of every update
    losses: np.ndarray  # [steps]: mean training loss of the proxy


def train_proxy(
    proxy: TinyGPT,
    reference: TinyGPT,
    batches: Iterable[Mapping[str, Any]],
    mixer: Any,
    cfg: TrainConfig,
    *,
    resample_to: Any = None,
    desc: str = "proxy (DoReMi)",
    progress: bool = True,
) -> ProxyResult:
    """Train the proxy with DoReMi (Xie et al. 2023, Algorithm 1).

    Every step: the reference's per-token loss (no gradient) and the proxy's per-token loss on the
    same batch go to ``mixer.step``, which updates α from the per-domain excess loss and returns
    the α-reweighted objective that is backpropagated.  With ``resample_to`` (a dataset with
    ``set_weights``), α instead changes what is sampled: the new α is handed to the dataset after
    every update and the proxy trains on the plain mean loss.
    """
    device = next(proxy.parameters()).device
    opt = _optimizer(proxy, cfg)
    k = int(mixer.weights.numel())
    trajectory = torch.empty(cfg.steps + 1, k, device=device)
    trajectory[0] = mixer.weights.detach().to(device)
    excess = torch.empty(cfg.steps, k, device=device)
    losses = torch.zeros(cfg.steps, device=device)
    reference.eval()
    proxy.train()
    it = iter(batches)
    with _bar(cfg.steps, desc, progress) as bar:
        for step in range(cfg.steps):
            tokens, domain = _to_device(next(it), device)
            for group in opt.param_groups:
                group["lr"] = cfg.lr_at(step)
            with torch.no_grad():
                ref_loss = reference(tokens)
            loss = proxy(tokens)
            objective = mixer.step(loss, ref_loss, domain)
            if resample_to is not None:
                # α now shapes the batches, so the loss itself is not reweighted a second time.
                objective = loss.mean()
                # step= fixes where the change lands, so the stream does not depend on when an
                # asynchronous (CUDA) copy of α happens to finish.
                resample_to.set_weights(mixer.weights.detach(), step=resample_to.next_step)
            objective.backward()
            nn.utils.clip_grad_norm_(proxy.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            trajectory[step + 1] = mixer.weights.detach()
            excess[step] = mixer.excess.detach()
            losses[step] = loss.detach().mean()
            bar.update(1)
            if progress and (step + 1) % _POSTFIX_EVERY == 0:
                top = int(trajectory[step + 1].argmax().item())
                bar.set_postfix(loss=f"{losses[step].item():.3f}", top=f"{top}")
    proxy.eval()
    return ProxyResult(
        trajectory=trajectory.cpu().double().numpy(),
        average_weights=mixer.average_weights.detach().cpu().double().numpy(),
        final_weights=mixer.weights.detach().cpu().double().numpy(),
        excess=excess.cpu().double().numpy(),
        losses=losses.cpu().numpy(),
    )


def heldout_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> torch.Tensor:
    """Windows of ``seq_len + 1`` tokens that overlap by one, so each byte is predicted once.

    Taken evenly across the held-out part when it holds more than ``max_windows``.
    """
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise ValueError(
            f"held-out part has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}"
        )
    starts = np.arange(n) * seq_len
    if n > max_windows:
        starts = starts[np.linspace(0, n - 1, max_windows).round().astype(np.int64)]
    rows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    return torch.from_numpy(rows)


@torch.no_grad()
def evaluate(
    model: TinyGPT,
    heldout: Mapping[str, np.ndarray],
    seq_len: int,
    *,
    batch_size: int = 32,
    max_windows: int = 256,
    eos_id: int | None = None,
    desc: str = "eval",
    progress: bool = True,
) -> dict[str, float]:
    """Held-out loss per byte (nats) of each domain.

    The sum of the loss over every predicted token, end-of-document tokens included, divided by
    the number of predicted tokens that are bytes (all but ``eos_id``): the usual bits-per-byte
    convention (up to the factor ln 2), so the separators are paid for but not counted as bytes.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    model.eval()
    result = {}
    for name in tqdm(list(heldout), desc=desc, unit="domain", disable=not progress, leave=False):
        windows = heldout_windows(heldout[name], seq_len, max_windows)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for chunk in windows.split(batch_size):
            total += model(chunk.to(device)).double().sum()
        targets = windows[:, 1:]
        n_bytes = int((targets != eos_id).sum()) if eos_id is not None else targets.numel()
        result[name] = float(total.item()) / max(1, n_bytes)
    return result


def iterate(batches: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """An endless iterator over ``batches`` (restarted if it ends, e.g. a finite stream)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("the batch stream yielded nothing")
