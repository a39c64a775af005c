"""Plots of a sweep (matplotlib, Agg backend: no display needed).

- ``plot_accuracy_vs_tokens``: accuracy against generated tokens per problem (log2 x axis), one
  line per model x method (each method's headline curve over N: the largest T, and for
  ``learned`` the largest R), error bars from the cells' confidence intervals, and the scaling
  efficiency of each candidate over the baseline drawn as a horizontal double arrow at the
  accuracy level where its maximum is reached, its 95% bootstrap interval in the corner note (or
  a note with the bound when the curves do not overlap, "not measurable" when they only touch).
- ``plot_pass_at_k``: pass@k against k (log2 x axis), one line per model x T.
- ``plot_accuracy_vs_rounds``: learned aggregation against the number of aggregation rounds R,
  one line per model x N, at the largest T: the final answer's accuracy (solid, with intervals)
  and the RSA population accuracy (thin dotted, same colour) where the cells carry it.

Inputs are the plain cell dicts written to ``cells.jsonl`` and the comparison dicts of
``efficiency.json``, so the plots can be redrawn from those files alone.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

METHOD_STYLE = {"pass": "-", "majority": "--", "learned": "-."}
METHOD_MARKER = {"pass": "o", "majority": "s", "learned": "^"}
METHOD_LABEL = {"pass": "pass@N", "majority": "majority@N", "learned": "learned (final answer)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _colors(models: list[str]) -> dict[str, Any]:
    plt = _pyplot()
    cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3"])
    return {m: cycle[i % len(cycle)] for i, m in enumerate(models)}


def _ordered(values: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def _yerr(rows: list[dict[str, Any]]) -> list[list[float]]:
    lo = [max(0.0, r["accuracy"] - r["ci_lo"]) for r in rows]
    hi = [max(0.0, r["ci_hi"] - r["accuracy"]) for r in rows]
    return [lo, hi]


def _log2_axis(ax) -> None:
    ax.set_xscale("log", base=2)
    ax.grid(True, which="major", alpha=0.3)


def headline_rows(cells: list[dict[str, Any]], model: str, method: str) -> list[dict[str, Any]]:
    """The cells of one model x method's headline curve over N (largest T; largest R for learned)."""
    rows = [c for c in cells if c["model"] == model and c["method"] == method and c["accuracy"] is not None]
    if not rows:
        return []
    t_max = max(c["T"] for c in rows)
    rows = [c for c in rows if c["T"] == t_max]
    r_max = max(c["R"] for c in rows)
    rows = [c for c in rows if c["R"] == r_max]
    return sorted(rows, key=lambda c: c["N"])


def _interval_note(comp: dict[str, Any]) -> str:
    """' [lo..hi]' for the max's 95% bootstrap interval, a note when it is not measurable, else ''."""
    if comp.get("interval_status") == "ok":
        lo, hi = comp["interval"]
        return f" [{lo:.2f}..{hi:.2f}]"
    if comp.get("interval_status") == "not_measurable":
        return " [CI not measurable]"
    return ""


def efficiency_is_measured(comp: dict[str, Any]) -> bool:
    """Whether a comparison carries an efficiency number (status ok over a range of positive width).

    The width test also reads efficiency.json of older versions, which gave curves that meet at a
    single accuracy level the status "ok" with a censored ratio as ``max``."""
    rng = comp.get("accuracy_range")
    return comp["status"] == "ok" and comp.get("max") is not None and bool(rng) and rng[0] < rng[1]


def efficiency_note(comp: dict[str, Any]) -> str:
    """The corner-note line of one comparison; a number only where an efficiency was measured."""
    tag = f"{comp['candidate']} vs {comp['baseline']}, {comp['method']}"
    rng = comp.get("accuracy_range")
    if efficiency_is_measured(comp):
        return f"{tag}: max {comp['max']:.2f}x{_interval_note(comp)} at acc {comp['max_level']:.3f}"
    if comp["status"] in ("not_measurable", "ok") and rng:
        return f"{tag}: not measurable (curves meet at one accuracy level only, {rng[0]:.3f})"
    if comp["status"] in ("candidate_dominates", "baseline_dominates", "no_overlap"):
        if comp.get("lower_bound") is not None:
            return f"{tag}: no overlap ({comp['status']}), > {comp['lower_bound']:.2f}x"
        return f"{tag}: no overlap ({comp['status']}), < {comp['upper_bound']:.2f}x"
    return f"{tag}: {comp['status']}"


def plot_accuracy_vs_tokens(
    cells: list[dict[str, Any]], comparisons: list[dict[str, Any]], path: str | Path, title: str = ""
) -> Path:
    plt = _pyplot()
    models = _ordered(c["model"] for c in cells)
    methods = _ordered(c["method"] for c in cells)
    colors = _colors(models)
    fig, ax = plt.subplots(figsize=(10.5, 5.5))
    for model in models:
        for method in methods:
            rows = headline_rows(cells, model, method)
            rows = [r for r in rows if r["generated_tokens_per_problem"] > 0]
            if not rows:
                continue
            extra = f" T={rows[0]['T']}" + (f" R={rows[0]['R']}" if method == "learned" else "")
            ax.errorbar(
                [r["generated_tokens_per_problem"] for r in rows], [r["accuracy"] for r in rows],
                yerr=_yerr(rows), color=colors[model], linestyle=METHOD_STYLE.get(method, "-"),
                marker=METHOD_MARKER.get(method, "o"), markersize=4, capsize=3,
                label=f"{model} {METHOD_LABEL.get(method, method)}{extra}",
            )
    notes: list[str] = []
    for comp in comparisons:
        if not comp.get("headline"):
            continue
        if efficiency_is_measured(comp):
            a = comp["max_level"]
            xb, xc = comp.get("baseline_compute_at_max"), comp.get("candidate_compute_at_max")
            if xb and xc:
                ax.annotate(
                    "", xy=(xb, a), xytext=(xc, a),
                    arrowprops=dict(arrowstyle="<->", color=colors.get(comp["candidate"], "k"), lw=1.5),
                )
                ax.text(
                    (xb * xc) ** 0.5, a, f" {comp['max']:.2f}x ({comp['method']})", fontsize=8,
                    ha="center", va="bottom", color=colors.get(comp["candidate"], "k"),
                    bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.7),
                )
        notes.append(efficiency_note(comp))
    if notes:
        ax.text(
            0.01, 0.99, "scaling efficiency (baseline compute / candidate compute) [95% CI]:\n" + "\n".join(notes),
            transform=ax.transAxes, fontsize=7, va="top", ha="left",
            bbox=dict(boxstyle="round", facecolor="white", alpha=0.8),
        )
    _log2_axis(ax)
    ax.set_xlabel("generated tokens per problem (log2)")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "accuracy vs inference compute")
    if ax.has_data():  # beside the axes: inside, it hid the learned curves at the largest budgets
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return _save(plt, fig, path)


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pass_at_k(cells: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    plt = _pyplot()
    rows_all = [c for c in cells if c["method"] == "pass" and c["accuracy"] is not None]
    models = _ordered(c["model"] for c in rows_all)
    colors = _colors(models)
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(7, 5))
    for model in models:
        ts = sorted({c["T"] for c in rows_all if c["model"] == model})
        for i, t in enumerate(ts):
            rows = sorted((c for c in rows_all if c["model"] == model and c["T"] == t), key=lambda c: c["N"])
            ax.errorbar(
                [r["N"] for r in rows], [r["accuracy"] for r in rows], yerr=_yerr(rows),
                color=colors[model], linestyle=styles[i % len(styles)], marker="o", markersize=4, capsize=3,
                label=f"{model} T={t}",
            )
    _log2_axis(ax)
    ax.set_xlabel("k (log2)")
    ax.set_ylabel("pass@k (unbiased)")
    ax.set_title(title or "pass@k of raw search traces")
    if ax.has_data():
        ax.legend(fontsize=8, loc="lower right")
    return _save(plt, fig, path)


def plot_accuracy_vs_rounds(cells: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Learned accuracy against R at the largest T; None (no file) when there are no learned cells."""
    rows_all = [c for c in cells if c["method"] == "learned" and c["accuracy"] is not None]
    if not rows_all:
        return None
    plt = _pyplot()
    models = _ordered(c["model"] for c in rows_all)
    colors = _colors(models)
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(7, 5))
    for model in models:
        mine = [c for c in rows_all if c["model"] == model]
        t_max = max(c["T"] for c in mine)
        ns = sorted({c["N"] for c in mine if c["T"] == t_max})
        for i, n in enumerate(ns):
            rows = sorted((c for c in mine if c["T"] == t_max and c["N"] == n), key=lambda c: c["R"])
            ax.errorbar(
                [r["R"] for r in rows], [r["accuracy"] for r in rows], yerr=_yerr(rows), color=colors[model],
                linestyle=styles[i % len(styles)], marker="^", markersize=4, capsize=3,
                label=f"{model} N={n} T={t_max}",
            )
            pop = [r for r in rows if r.get("population_accuracy") is not None]
            if pop:
                ax.plot([r["R"] for r in pop], [r["population_accuracy"] for r in pop], color=colors[model],
                        linestyle=":", linewidth=1, marker=".", label=f"{model} N={n} population")
    ax.set_xlabel("aggregation rounds R")
    ax.set_ylabel("final answer accuracy (dotted: RSA population)")
    ax.set_title(title or "learned aggregation per round")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(plt, fig, path)


def image_formats() -> list[str]:
    """The file extensions matplotlib can write (png, pdf, svg, ...)."""
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted(FigureCanvasBase.get_supported_filetypes())


def check_image_path(path: str | Path) -> str | None:
    """Why `path` cannot take a plot (one line), or None when it can: its folder must exist and
    its extension be an image format matplotlib writes. Cheap: checked before any work."""
    path = Path(path)
    ext = path.suffix.lower().lstrip(".")
    if not ext or ext not in image_formats():
        return f"cannot write a plot to {path}: give a file ending in .png, .pdf or .svg (or one of {', '.join(image_formats())})"
    if path.is_dir():
        return f"cannot write a plot to {path}: it is a directory"
    if not path.parent.is_dir():
        return f"cannot write a plot to {path}: folder {path.parent} does not exist"
    return None


CURVE_METRICS = {"pass@1": ("-", "o", "pass@1"), "learned_agg@": ("-.", "^", "learned agg")}


def _curve(history: list[dict[str, Any]], metric: str) -> tuple[list[float], list[float], list[float]]:
    """(steps, generated tokens, values) of the first eval key containing `metric`."""
    keys = [k for k in (history[0] if history else {}) if metric in k and "/" in k]
    if not keys:
        return [], [], []
    key = sorted(keys)[0]
    pts = [h for h in history if key in h]
    return [h["step"] for h in pts], [h["generated_tokens"] for h in pts], [100 * h[key] for h in pts]


def plot_training_curves(runs: dict[str, list[dict[str, Any]]], path: str | Path, title: str = "") -> Path:
    """Held-out accuracy of RL runs against optimizer step and against generated tokens.

    `runs` maps a run name to its eval points (``runs/<name>/eval.jsonl``: step,
    generated_tokens and the eval metrics such as ``T256/pass@1``)."""
    plt = _pyplot()
    colors = _colors(list(runs))
    fig, (ax_step, ax_tok) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for name, history in runs.items():
        for metric, (style, marker, label) in CURVE_METRICS.items():
            steps, tokens, values = _curve(history, metric)
            if not values:
                continue
            kw = dict(color=colors[name], linestyle=style, marker=marker, label=f"{name} {label}")
            ax_step.plot(steps, values, **kw)
            ax_tok.plot([t / 1e3 for t in tokens], values, **kw)
    ax_step.set_xlabel("optimizer step")
    ax_tok.set_xlabel("generated tokens (thousands)")
    ax_step.set_ylabel("held-out accuracy (%)")
    for ax in (ax_step, ax_tok):
        ax.grid(alpha=0.3)
    ax_tok.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    return _save(plt, fig, path)
