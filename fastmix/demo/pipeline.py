"""The demo end to end: corpus → reference → DoReMi proxy → two main models → evaluation → report.

Data always flows through fastmix: the corpus is a :class:`fastmix.TokenCorpus`, every batch comes
from a :class:`fastmix.MixtureDataset` (the C++ sampler and window permutation), and the proxy's
weights are updated by :class:`fastmix.DoReMi`'s fused step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastmix._io import atomic_write_files, json_text
from fastmix.demo import report
from fastmix.demo.corpus import DOMAINS, CorpusSpec, build_corpus
from fastmix.demo.model import GPTConfig
from fastmix.demo.options import DemoOptions, usable_cpus
from fastmix.demo.train import (
    ProxyResult,
    TrainConfig,
    deterministic_torch,
    evaluate,
    new_model,
    pick_device,
    train_lm,
    train_proxy,
)


@dataclass
class DemoResult:
    """Paths of what was written and the numbers behind them."""

    out: Path
    domains: list[str]
    uniform_weights: dict[str, float]
    doremi_weights: dict[str, float]
    uniform_loss: dict[str, float]  # nats per byte
    doremi_loss: dict[str, float]
    reference_loss: dict[str, float] | None
    proxy: ProxyResult | None
    timings: dict[str, float]
    files: dict[str, Path] = field(default_factory=dict)


def _dataset(corpus: Any, opts: DemoOptions, weights: Mapping[str, float], seed: int) -> Any:
    from fastmix.data import MixtureDataset

    return MixtureDataset(
        corpus,
        opts.seq_len,
        dict(weights),
        seed=seed,
        method=opts.sampler,
        batch_size=opts.batch_size,
    )


def run_demo(
    opts: DemoOptions, *, log: Callable[[str], None] = print
) -> DemoResult:
    """Run the whole demo under ``opts.out`` and return what it measured and wrote.

    Deterministic given ``opts.seed`` and the thread count on a given machine and device (the
    same bits run after run; another thread count changes the order of float sums).
    """
    device = pick_device(opts.device)
    # On the CPU use every core this process may run on (torch's default can count hyperthreads
    # or ignore the affinity mask).
    threads = opts.threads or (usable_cpus() if device.type == "cpu" else None)
    with deterministic_torch(opts.seed, device, threads):
        return _run(opts, device, log)


def _run(opts: DemoOptions, device: torch.device, log: Callable[[str], None]) -> DemoResult:
    from fastmix.mixers import DoReMi

    timings: dict[str, float] = {}
    started = time.perf_counter()

    def mark(stage: str, t0: float) -> None:
        timings[stage] = time.perf_counter() - t0

    if opts.weights is not None:  # read again below in the corpus's order; checked here
        report.load_weights(opts.weights, DOMAINS)  # before minutes of corpus building
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    spec = CorpusSpec(
        seed=opts.seed, train_bytes=opts.train_bytes, heldout_bytes=opts.heldout_bytes
    )
    corpus = build_corpus(out, spec, progress=opts.progress, force=opts.rebuild)
    mark("corpus", t0)
    train_corpus = corpus.train_corpus()
    # The batches' domain ids, and so DoReMi's α, index the corpus's own domain order.
    domains = list(train_corpus.names)
    k = len(domains)
    heldout = corpus.heldout_tokens()
    log(
        f"corpus: {k} domains under {corpus.root}, train tokens: "
        + ", ".join(f"{d} {n / 1e6:.2f}M" for d, n in train_corpus.tokens.items())
    )
    uniform = {name: 1.0 / k for name in domains}
    cfg = opts.proxy_config(corpus.vocab_size)
    main_cfg = opts.main_config(corpus.vocab_size)
    train_cfg = TrainConfig(steps=opts.steps, lr=opts.lr)
    main_train_cfg = replace(train_cfg, steps=opts.total_main_steps)
    tokens_per_step = opts.batch_size * opts.seq_len
    log(
        f"device: {device}; models: d_model={cfg.d_model} layers={cfg.n_layers} "
        f"heads={cfg.n_heads} seq_len={cfg.seq_len}; {opts.steps} steps x {tokens_per_step} "
        "tokens per stage"
    )

    reference_loss: dict[str, float] | None = None
    proxy_result: ProxyResult | None = None
    if opts.weights is not None:
        doremi_weights = report.load_weights(opts.weights, domains)
        weights_source = f"read from `{opts.weights}` (no reference or proxy run)"
        log(f"weights from {opts.weights}: " + _fmt(doremi_weights))
    else:
        # 1. The reference model, on the reference (uniform) distribution.
        t0 = time.perf_counter()
        reference = new_model(cfg, opts.seed, device)
        ref_losses = train_lm(
            reference,
            _dataset(train_corpus, opts, uniform, seed=opts.seed),
            train_cfg,
            desc="reference",
            progress=opts.progress,
        )
        _check_losses("reference", ref_losses, opts)
        mark("reference", t0)

        # 2. The DoReMi proxy: same size, batches from the reference distribution, loss
        # reweighted by α (or, with --resample, α fed to the sampler as it changes).
        t0 = time.perf_counter()
        proxy = new_model(cfg, opts.seed + 1, device)
        proxy_data = _dataset(train_corpus, opts, uniform, seed=opts.seed + 1)
        mixer = DoReMi(
            k,
            step_size=opts.step_size,
            smoothing=opts.smoothing,
            init_weights=torch.full((k,), 1.0 / k, device=device),
            proxy_loss=opts.proxy_loss,
            # Same bits run after run on a GPU too: no order-dependent float atomics.
            deterministic=True,
        )
        proxy_result = train_proxy(
            proxy,
            reference,
            proxy_data,
            mixer,
            train_cfg,
            resample_to=proxy_data if opts.resample else None,
            progress=opts.progress,
        )
        _check_losses("proxy", proxy_result.losses, opts)
        _check_updates(mixer, opts)
        mark("proxy", t0)
        doremi_weights = dict(zip(domains, proxy_result.average_weights.tolist(), strict=True))
        total = math.fsum(doremi_weights.values())
        doremi_weights = {name: w / total for name, w in doremi_weights.items()}
        weights_source = "DoReMi's average α over the proxy run"
        log("DoReMi weights (average α): " + _fmt(doremi_weights))
        t0 = time.perf_counter()
        reference_loss = evaluate(
            reference, heldout, opts.seq_len, max_windows=opts.eval_windows,
            eos_id=corpus.eos_id, desc="eval reference", progress=opts.progress,
        )
        _check_heldout("reference", reference_loss, opts)
        mark("eval reference", t0)
        del reference, proxy

    # 3. Two main models from the same initialisation, same number of tokens, different mixtures.
    losses: dict[str, dict[str, float]] = {}
    weighted = _weights_label(proxy_result)
    for label, weights in (("uniform", uniform), (weighted, doremi_weights)):
        t0 = time.perf_counter()
        model = new_model(main_cfg, opts.seed + 2, device)
        main_losses = train_lm(
            model,
            _dataset(train_corpus, opts, weights, seed=opts.seed + 2),
            main_train_cfg,
            desc=f"main ({label})",
            progress=opts.progress,
        )
        _check_losses(f"main ({label})", main_losses, opts)
        losses[label] = evaluate(
            model, heldout, opts.seq_len, max_windows=opts.eval_windows,
            eos_id=corpus.eos_id, desc=f"eval {label}", progress=opts.progress,
        )
        _check_heldout(f"main ({label})", losses[label], opts)
        mark(f"main {label} (train + eval)", t0)
        del model

    # 4. The report.
    t0 = time.perf_counter()
    files = _write_outputs(
        out,
        opts,
        domains,
        uniform,
        doremi_weights,
        losses["uniform"],
        losses[weighted],
        reference_loss,
        proxy_result,
        timings,
        weights_source,
        str(device),
        started,
    )
    mark("report", t0)
    timings["total"] = time.perf_counter() - started
    return DemoResult(
        out=out,
        domains=domains,
        uniform_weights=uniform,
        doremi_weights=doremi_weights,
        uniform_loss=losses["uniform"],
        doremi_loss=losses[weighted],
        reference_loss=reference_loss,
        proxy=proxy_result,
        timings=timings,
        files=files,
    )


# A diverged stage (too high a learning rate) trains on NaN without an error: its NaN losses
# reached the outputs, DoReMi skipped every update (so weights.json claimed the initial uniform α
# as "DoReMi's average"), and the figure then failed in matplotlib.  Each stage is checked as it
# ends, so the run stops with the reason before anything is written.
def _diverged(what: str, opts: DemoOptions, hint: str = "") -> ValueError:
    return ValueError(f"training diverged: {what}; lower --lr (now {opts.lr:g}){hint}")


def _check_losses(stage: str, losses: np.ndarray, opts: DemoOptions) -> None:
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        i = int(bad[0])
        raise _diverged(
            f"the {stage} model's training loss is {losses[i]} at step {i + 1} of "
            f"{len(losses)}", opts)


def _check_heldout(stage: str, loss: Mapping[str, float], opts: DemoOptions) -> None:
    for name, value in loss.items():
        if not math.isfinite(value):
            raise _diverged(f"the {stage} model's held-out loss on {name} is {value}", opts)


def _check_updates(mixer: Any, opts: DemoOptions) -> None:
    # An update is skipped when the excess loss or the new α is not finite: the average α would
    # then come from the other updates only (or be the initial α when none was applied).
    skipped, applied = int(mixer.num_skipped), int(mixer.num_updates)
    if skipped:
        raise _diverged(
            f"DoReMi skipped {skipped} of its {skipped + applied} updates (a non-finite excess "
            "loss or α)", opts, f" or --step-size (now {opts.step_size:g})")


def _write_outputs(
    out: Path,
    opts: DemoOptions,
    domains: list[str],
    uniform: dict[str, float],
    doremi_weights: dict[str, float],
    uniform_loss: dict[str, float],
    doremi_loss: dict[str, float],
    reference_loss: dict[str, float] | None,
    proxy_result: ProxyResult | None,
    timings: dict[str, float],
    weights_source: str,
    device: str,
    started: float,
) -> dict[str, Path]:
    cfg, main_cfg = opts.proxy_config(), opts.main_config()
    # Outputs list the domains in the builder's order (code, prose, math, data, noise), not the
    # corpus's alphabetical one; the trajectory's columns follow.
    trajectory = None
    if proxy_result is not None:
        trajectory = proxy_result.trajectory
    order = list(domains)
    domains, trajectory = _display_order(domains, trajectory)
    settings = {
        "seed": opts.seed,
        "device": device,
        "threads": torch.get_num_threads(),
        "proxy/reference model": _shape(cfg),
        "main models": _shape(main_cfg),
        "steps (reference, proxy)": opts.steps,
        "steps (each main model)": opts.total_main_steps,
        "batch x seq_len": f"{opts.batch_size} x {opts.seq_len}",
        "tokens per main model": opts.total_main_steps * opts.batch_size * opts.seq_len,
        "learning rate": opts.lr,
        "DoReMi step size / smoothing": f"{opts.step_size} / {opts.smoothing}",
        "proxy objective": (
            "resampled by α" if opts.resample else f"{opts.proxy_loss} (α-reweighted)"
        ),
        "sampler": opts.sampler,
        "preset": "--quick" if opts.quick else "default",
    }
    if proxy_result is None:  # --weights: no reference or proxy ran, so none of their settings
        for key in ("proxy/reference model", "steps (reference, proxy)",
                    "DoReMi step size / smoothing", "proxy objective"):
            del settings[key]
    files = {name: out / fname for name, fname in (
        ("weights", report.WEIGHTS_FILE),
        ("results", report.RESULTS_FILE),
        ("table", report.TABLE_FILE),
        ("figure", report.FIGURE_FILE),
        ("report", report.REPORT_FILE),
    )}
    label = _weights_label(proxy_result)
    table = report.results_table(
        domains, uniform, doremi_weights, uniform_loss, doremi_loss, reference_loss, label=label
    )
    results = {
        "unit": "held-out loss in bits per byte (nats per byte / ln 2)",
        "domains": domains,
        "uniform_weights": uniform,
        "doremi_weights": doremi_weights,
        "uniform_model_bpb": {n: report.bits(v) for n, v in uniform_loss.items()},
        "doremi_model_bpb": {n: report.bits(v) for n, v in doremi_loss.items()},
        "reference_bpb": (
            {n: report.bits(v) for n, v in reference_loss.items()} if reference_loss else None
        ),
        "weight_trajectory": trajectory.tolist() if trajectory is not None else None,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "settings": settings,
        "timings_s": dict(timings),
    }
    # The title names the proxy run; without one (--weights), the main models.
    shown_cfg, shown_steps = (
        (cfg, opts.steps) if proxy_result is not None else (main_cfg, opts.total_main_steps)
    )
    png = report.figure_png(
        domains,
        trajectory,
        uniform_loss,
        doremi_loss,
        reference_loss,
        title=f"fastmix demo: {_shape(shown_cfg)}, {shown_steps} steps of {opts.batch_size}x"
        f"{opts.seq_len} bytes, seed {opts.seed}",
        label=label,
    )
    shown = dict(timings)
    shown["total (before report)"] = time.perf_counter() - started
    markdown = report.report_markdown(
        table=table,
        domains=domains,
        doremi_weights=doremi_weights,
        uniform_loss=uniform_loss,
        doremi_loss=doremi_loss,
        settings=settings,
        timings=shown,
        weights_source=weights_source,
        label=label,
        reference=(
            None if reference_loss is None
            else "same" if (cfg, opts.steps) == (main_cfg, opts.total_main_steps) else "other"
        ),
    )
    weights_text = report.weights_json(
        doremi_weights,
        method="doremi" if proxy_result is not None else "file",
        source=weights_source,
        final_weights=(
            {d: float(proxy_result.final_weights[order.index(d)]) for d in domains}
            if proxy_result is not None
            else None
        ),
        reference_weights=uniform,
        # DoReMi's settings and the proxy's shape, or null where the weights were read (no run)
        **{k: v if proxy_result is not None else None for k, v in (
            ("step_size", opts.step_size),
            ("smoothing", opts.smoothing),
            ("proxy_loss", opts.proxy_loss),
            ("resample", opts.resample),
        )},
        proxy_steps=opts.steps if proxy_result is not None else 0,
        seed=opts.seed,
        model=cfg.to_dict() if proxy_result is not None else None,
        fastmix_version=_version(),
    )
    # Everything is rendered first (the figure takes ~1 s) and written as one set: all to disk
    # under temporary names, then renamed in a row (weights.json last), so a run interrupted
    # or failing while writing leaves the files of the previous run, not a mix.
    atomic_write_files([
        (files["results"], json_text(results).encode()),
        (files["table"], table.encode()),
        (files["figure"], png),
        (files["report"], markdown.encode()),
        (files["weights"], weights_text.encode()),
    ])
    return files


def _display_order(
    domains: list[str], trajectory: np.ndarray | None
) -> tuple[list[str], np.ndarray | None]:
    shown = [d for d in DOMAINS if d in domains] + [d for d in domains if d not in DOMAINS]
    if trajectory is not None:
        trajectory = trajectory[:, [domains.index(d) for d in shown]]
    return shown, trajectory


def _version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("fastmix")
    except metadata.PackageNotFoundError:
        return None


def _weights_label(proxy_result: ProxyResult | None) -> str:
    """What the non-uniform weights are called in the log and the outputs: weights read with
    --weights (no proxy run) are no DoReMi result, so they are "given"."""
    return "DoReMi" if proxy_result is not None else "given"


def _shape(cfg: GPTConfig) -> str:
    layers = "layer" if cfg.n_layers == 1 else "layers"
    heads = "head" if cfg.n_heads == 1 else "heads"
    return f"d_model {cfg.d_model}, {cfg.n_layers} {layers}, {cfg.n_heads} {heads}"


def _fmt(weights: Mapping[str, float]) -> str:
    shown, _ = _display_order(list(weights), None)
    return ", ".join(f"{k} {weights[k]:.3f}" for k in shown)
