"""The paper's table from the score outputs of several folds: mean and std (numpy, ddof 0) of the fold means.

Each table value is one fold's mean over its test volumes (``metrics.json`` of ``score.yaml``), averaged over the
folds; its ± is the standard deviation of those fold means, as the published numbers are computed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from custom_components.utils import write_json_atomic, write_text_atomic

# (data set, metric): how the paper's table shows it, and the published value (cDDPM arXiv 2312.04215 v1,
# Table 3, SSL+ENS; percent). No IXI value is given there.
TABLE = (
    ("Brats21", "dice", "BraTS21 Dice (%)", 100, (53.37, 1.80)),
    ("Brats21", "auprc", "BraTS21 AUPRC (%)", 100, (58.84, 1.76)),
    ("MSLUB", "dice", "MSLUB Dice (%)", 100, (11.51, 1.24)),
    ("MSLUB", "auprc", "MSLUB AUPRC (%)", 100, (11.13, 1.26)),
    ("IXI", "l1", "IXI L1 error", 1, None),
)
PUBLISHED_BASELINE = {"Brats21": 19.69, "MSLUB": 6.21}  # intensity threshold baseline, Dice (%)


def _metrics_file(run) -> Path:
    path = Path(run)
    path = path / "metrics.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give each fold's score output folder (score.yaml's "
                                "output_dir) or its metrics.json.")
    return path


def fold_table(runs) -> dict:
    """``table.json``'s content for the score outputs ``runs`` (one per fold, in fold order)."""
    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    if not runs:
        raise ValueError("summarize_folds needs at least one run.")
    results = [json.loads(_metrics_file(r).read_text()) for r in runs]
    protocols = {r.get("settings", {}).get("protocol") for r in results}
    if len(protocols) != 1:
        raise ValueError(f"The runs were scored under different protocols ({sorted(map(str, protocols))}): "
                         "score every fold under the same one.")
    baselines = {bool(r.get("settings", {}).get("baseline")) for r in results}
    table: dict = {"protocol": protocols.pop(), "n_folds": len(runs), "baseline": baselines == {True},
                   "runs": [str(r) for r in runs]}
    for dataset, metric, _, _, published in TABLE:
        folds = []
        for run, result in zip(runs, results):
            stats = result.get(dataset, {}).get("metrics", {}).get(metric)
            folds.append(None if stats is None else stats["mean"])
        present = np.array([f for f in folds if f is not None], dtype=np.float64)
        entry = {"mean": float(present.mean()) if present.size else None,
                 "std": float(present.std(ddof=0)) if present.size else None, "folds": folds}
        if published:
            entry["published"] = {"mean": published[0], "std": published[1]}
        table.setdefault(dataset, {})[metric] = entry
    return table


def table_markdown(table: dict) -> str:
    """The table in the paper's layout: one row per metric, our mean ± std beside the published one, then the folds."""
    n = table["n_folds"]
    lines = [f"# {'Intensity baseline' if table['baseline'] else 'Results'}: {n} fold(s), "
             f"protocol `{table['protocol']}`", "",
             "Mean over folds of each fold's mean over test volumes; ± = std of the fold means (ddof 0).", "",
             "| metric | this run | published | " + " | ".join(f"fold {i}" for i in range(n)) + " |",
             "|---|---|---|" + "---|" * n]

    def fmt(value, scale):
        return "–" if value is None else f"{value * scale:.2f}" if scale != 1 else f"{value:.4f}"

    for dataset, metric, label, scale, published in TABLE:
        entry = table[dataset][metric]
        ours = "–" if entry["mean"] is None else f"{fmt(entry['mean'], scale)} ± {fmt(entry['std'], scale)}"
        theirs = "–" if not published or table["baseline"] else f"{published[0]:.2f} ± {published[1]:.2f}"
        if table["baseline"] and dataset in PUBLISHED_BASELINE and metric == "dice":
            theirs = f"{PUBLISHED_BASELINE[dataset]:.2f}"
        lines.append(f"| {label} | {ours} | {theirs} | " + " | ".join(fmt(f, scale) for f in entry["folds"]) + " |")
    lines += ["", "Published: cDDPM (arXiv 2312.04215 v1), Table 3, SSL+ENS; intensity threshold baseline Dice "
              f"BraTS21 {PUBLISHED_BASELINE['Brats21']}, MSLUB {PUBLISHED_BASELINE['MSLUB']}. "
              "Published numbers are comparable only under the `reference` protocol.", ""]
    return "\n".join(lines)


def summarize_folds(runs, out) -> Path:
    """Write ``out/table.json`` and ``out/table.md`` for the score outputs ``runs``; returns ``out``."""
    table = fold_table(runs)
    out = Path(out)
    write_json_atomic(out / "table.json", table)
    write_text_atomic(out / "table.md", table_markdown(table))
    return out
