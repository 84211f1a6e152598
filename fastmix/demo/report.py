"""What the demo writes: the results table, ``weights.json``, the PNG figure and ``report.md``.

Every file is written under a temporary name and renamed into place, so a crash never leaves a
half-written file that looks valid.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastmix._checks import unique_keys
from fastmix._io import json_text

LN2 = math.log(2.0)
WEIGHTS_FILE = "weights.json"
RESULTS_FILE = "results.json"
TABLE_FILE = "table.md"
FIGURE_FILE = "doremi.png"
REPORT_FILE = "report.md"
# Every file the demo writes into --out (checked before the run: none may be a folder).
OUTPUT_FILES = (WEIGHTS_FILE, RESULTS_FILE, TABLE_FILE, FIGURE_FILE, REPORT_FILE)


def bits(nats: float) -> float:
    """Nats per byte to bits per byte."""
    return nats / LN2


def weights_json(weights: Mapping[str, float], **metadata: Any) -> str:
    """The text of a weights file, ``{"weights": {domain: w}, ...metadata}``; the weights sum
    to one."""
    total = math.fsum(weights.values())
    normalised = {name: float(w) / total for name, w in weights.items()}
    return json_text({"weights": normalised, **metadata})


def load_weights(path: str | os.PathLike[str], domains: Sequence[str]) -> dict[str, float]:
    """Read mixture weights from a JSON file, checked against ``domains`` and normalised.

    Read by the function :class:`fastmix.MixtureDataset` uses (:func:`fastmix.data.load_weights`):
    ``{"weights": {domain: w}, ...}`` as the demo and ``fastmix optimize`` write it, or a bare
    ``{domain: w}``; a domain left out gets weight 0.  Unlike the dataset, no bare list: the demo
    lists its domains in another order than the corpus's, so a list would be misread.
    """
    from fastmix.data import load_weights as read

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
    except (OSError, ValueError):  # (a JSONDecodeError, bad UTF-8 or a key given twice)
        data = path  # unreadable: read() says why, naming the file
    if isinstance(data, dict) and "weights" in data:
        data = data["weights"]
    if isinstance(data, list):  # the demo prints domains in its own order, not the corpus's
        raise ValueError(
            f"--weights {path}: a list names no domains; give {{domain: weight}} "
            f"(domains: {', '.join(domains)})"
        )
    if not isinstance(data, (dict, Path)):
        raise ValueError(
            f"--weights {path}: must hold {{'weights': {{domain: w}}}} or {{domain: w}}"
        )
    try:
        w = np.asarray(read(data, list(domains)), dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--weights {path}: {exc}") from None
    return {name: float(v) for name, v in zip(domains, w / w.sum(), strict=True)}


def results_table(
    domains: Sequence[str],
    uniform_weights: Mapping[str, float],
    doremi_weights: Mapping[str, float],
    uniform_loss: Mapping[str, float],
    doremi_loss: Mapping[str, float],
    reference_loss: Mapping[str, float] | None,
    *,
    label: str = "DoReMi",
) -> str:
    """The results as a Markdown table; losses in bits per byte (inputs in nats per byte).

    ``label`` names where the non-uniform weights came from ("given" for ``--weights``)."""
    header = (
        f"| domain | uniform weight | {label} weight | uniform model (bpb) | {label} model (bpb) "
        "| change | reference (bpb) |\n|---|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for name in domains:
        u, d = bits(uniform_loss[name]), bits(doremi_loss[name])
        ref = f"{bits(reference_loss[name]):.3f}" if reference_loss else "–"
        rows.append(
            f"| {name} | {uniform_weights[name]:.3f} | {doremi_weights[name]:.3f} "
            f"| {u:.3f} | {d:.3f} | {d - u:+.3f} | {ref} |"
        )
    mean_u = float(np.mean([bits(uniform_loss[n]) for n in domains]))
    mean_d = float(np.mean([bits(doremi_loss[n]) for n in domains]))
    mean_r = (
        f"{float(np.mean([bits(reference_loss[n]) for n in domains])):.3f}"
        if reference_loss
        else "–"
    )
    rows.append(
        f"| **mean** | | | {mean_u:.3f} | {mean_d:.3f} | {mean_d - mean_u:+.3f} | {mean_r} |"
    )
    return header + "\n".join(rows) + "\n"


def figure_png(
    domains: Sequence[str],
    trajectory: np.ndarray | None,
    uniform_loss: Mapping[str, float],
    doremi_loss: Mapping[str, float],
    reference_loss: Mapping[str, float] | None,
    *,
    title: str = "",
    label: str = "DoReMi",
) -> bytes:
    """The figure as PNG bytes: α over the proxy's steps, and per-domain held-out losses.

    Uses matplotlib's Agg canvas directly, so no global backend is switched and no display is
    needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    ax_w, ax_l = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.15, 1]})
    colors = [f"C{i}" for i in range(len(domains))]
    if trajectory is not None:
        steps = np.arange(trajectory.shape[0])
        for i, name in enumerate(domains):
            ax_w.plot(steps, trajectory[:, i], color=colors[i], lw=1.4, label=name)
            avg = trajectory[1:, i].mean() if trajectory.shape[0] > 1 else trajectory[0, i]
            ax_w.axhline(avg, color=colors[i], lw=0.9, ls="--", alpha=0.7)
        ax_w.set_yscale("log")
        ax_w.set_xlabel("proxy step")
        ax_w.set_ylabel("domain weight α (log scale)")
        ax_w.set_title("DoReMi weights during the proxy run (dashed: average)")
        ax_w.legend(loc="best", fontsize=8)
    else:
        ax_w.text(0.5, 0.5, "weights read from a file:\nno proxy run", ha="center", va="center")
        ax_w.set_axis_off()
    x = np.arange(len(domains))
    width = 0.27
    bars = [("uniform model", uniform_loss, "0.6"), (f"{label} model", doremi_loss, "C3")]
    if reference_loss:
        bars.append(("reference", reference_loss, "0.85"))
    for j, (label, losses, color) in enumerate(bars):
        offset = (j - (len(bars) - 1) / 2) * width
        ax_l.bar(
            x + offset, [bits(losses[n]) for n in domains], width, label=label, color=color
        )
    for i, name in enumerate(domains):
        # The weighted model's change against the uniform one, over each group of bars.
        change = bits(doremi_loss[name]) - bits(uniform_loss[name])
        top_i = max(bits(losses[name]) for _, losses, _ in bars)
        ax_l.text(i, top_i + 0.1, f"{change:+.2f}", ha="center", va="bottom", fontsize=8,
                  color="C3" if change < 0 else "0.3")
    ax_l.set_xticks(x, list(domains))
    ax_l.set_ylabel("held-out loss (bits per byte)")
    ax_l.set_title(f"Held-out loss of the main models (label: {label} − uniform)")
    # Headroom above the tallest bar keeps the legend off the bars.
    top = max(bits(losses[n]) for _, losses, _ in bars for n in domains)
    ax_l.set_ylim(0, top * 1.2)
    ax_l.legend(fontsize=8, ncol=len(bars), loc="upper center")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# What the reference column means, by report_markdown's ``reference``.
_REFERENCE_NOTE = {
    "same": "The reference is a uniform model of the same size and length with other\n"
    "seeds: its gap to the uniform main model shows how much a result moves with the seed.",
    # (--main-d-model/--main-layers/--main-heads or --main-steps: the gap is not seed noise)
    "other": "The reference is a uniform model of the proxy's size and length, which differ\n"
    "from the main models': its gap to the uniform main model is not the seed's effect alone.",
    None: "No reference model was trained (the weights were read from a file).",
}


def report_markdown(
    *,
    table: str,
    domains: Sequence[str],
    doremi_weights: Mapping[str, float],
    uniform_loss: Mapping[str, float],
    doremi_loss: Mapping[str, float],
    settings: Mapping[str, Any],
    timings: Mapping[str, float],
    weights_source: str,
    reference: str | None,
    label: str = "DoReMi",
) -> str:
    """A short report that points to the table, ``weights.json`` and the figure.

    ``reference`` says what the reference column holds: ``"same"`` (a uniform model of the main
    models' shape and length: its gap to the uniform main model is the seed's effect),
    ``"other"`` (the main models have another shape or number of steps) or ``None`` (no
    reference run: the weights were read from a file).  ``label`` names where the non-uniform
    weights came from ("given" for ``--weights``).
    """
    if reference not in ("same", "other", None):
        raise ValueError(f"reference must be 'same', 'other' or None, got {reference!r}")
    better = [n for n in domains if doremi_loss[n] < uniform_loss[n]]
    top = max(domains, key=lambda n: doremi_weights[n])
    low = min(domains, key=lambda n: doremi_weights[n])
    lines = [
        f"# fastmix demo: {label} weights on a five-domain byte-level corpus"
        if label != "DoReMi" else "# fastmix demo: DoReMi on a five-domain byte-level corpus",
        "",
        f"Weights: {weights_source}. Losses are held-out **bits per byte** (lower is better;",
        "tokens are bytes, and the end-of-document markers are scored but not counted as bytes).",
        "Both main models start from the same initialisation and see the same number of tokens;",
        "only the mixture differs. " + _REFERENCE_NOTE[reference],
        "",
        table,
        (f"{label} gives" if label == "DoReMi" else f"The {label} weights give")
        + f" the most weight to **{top}** ({doremi_weights[top]:.3f}) and the least to "
        f"**{low}** ({doremi_weights[low]:.3f}). The {label} model is better than the uniform one "
        f"on {len(better)} of {len(domains)} domains"
        + (f" ({', '.join(better)})." if better else "."),
        "",
        f"- weights: [`{WEIGHTS_FILE}`]({WEIGHTS_FILE}) (readable by `fastmix.MixtureDataset` and "
        f"by `fastmix demo --weights`)",
        f"- figure: [`{FIGURE_FILE}`]({FIGURE_FILE})",
        f"- all numbers: [`{RESULTS_FILE}`]({RESULTS_FILE})",
        "",
        f"![{label} weights and held-out losses]({FIGURE_FILE})",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in settings.items()]
    lines += ["", "## Time per stage (seconds)", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    return "\n".join(lines) + "\n"
