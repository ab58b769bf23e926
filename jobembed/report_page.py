"""``report/index.html``: the report as one self-contained page to look at.

One HTML file: figures inlined as data URIs, a few lines of inline script to sort tables, no CDN, no build step, and
a Content-Security-Policy that lets nothing leave the page (no request, not even for a font). It holds the answer
first, the CV and test tables, the tests against the best system, the fine-tuned rows, per-class F1 (sortable), the
confusion matrix with the worst pairs named, coverage-accuracy and reliability curves, suspected label noise and the
cleaning summary. It holds numbers, labels, category names and ad ids, never an ad's text: ``jobembed serve`` can show
it (``serve.report``) without exposing an ad.

Data contract: ``render_page(metrics, ...)`` takes the report's ``metrics.json`` content (with ``figures``), the
figure folder, the category names, the winner's per-class test table and ``PageExtras`` (the confusion pairs and the
suspected label noise, computed from the evaluation); it returns the page as a string.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# Nothing leaves the page: images are data URIs, style and script are inline.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

_STYLE = """
body{font:15px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:0 auto;max-width:1100px;padding:1.5rem;
color:#1d2330}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #dde;padding-bottom:.2rem}
.answer{background:#f3f7fd;border-left:4px solid #4c72b0;padding:.6rem 1rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:13px}
th,td{padding:.25rem .55rem;border-bottom:1px solid #e4e6ec;text-align:left}
th{background:#f6f7f9;position:sticky;top:0}table.sortable th{cursor:pointer}
table.sortable th:after{content:" \\2195";color:#9aa}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.best td{font-weight:600}img{max-width:100%;height:auto;border:1px solid #eee}.note{color:#566;font-size:13px}
"""

# Click a header to sort by that column (numbers as numbers); click again to reverse.
_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var down = th.getAttribute("data-order") !== "desc";
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("data-order"); });
      th.setAttribute("data-order", down ? "desc" : "asc");
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute("data-v"), y = b.cells[col].getAttribute("data-v");
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
        return down ? -c : c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


@dataclass
class PageExtras:
    """What the page shows beyond metrics.json.

    Attributes:
        worst_pairs: (true label, predicted label, test ads, share of the true class) of the winner's most frequent
            confusions on test, most first.
        noise: (label, predicted label, dev ads, example ad ids) of the dev ads whose out-of-fold answer by the
            winner disagrees with their label at or above ``noise_confidence``, most first.
        noise_confidence: the confidence threshold of ``noise``.
    """

    worst_pairs: list[tuple[str, str, int, float]] = field(default_factory=list)
    noise: list[tuple[str, str, int, list[str]]] = field(default_factory=list)
    noise_confidence: float = 0.9


def confusion_pairs(y_true: np.ndarray, y_pred: np.ndarray, *, top: int = 12) -> list[tuple[str, str, int, float]]:
    """The most frequent (true, predicted) confusions, with their share of the true class."""
    frame = pd.DataFrame({"t": np.asarray(y_true, dtype=str), "p": np.asarray(y_pred, dtype=str)})
    totals = frame["t"].value_counts()
    wrong = frame[frame["t"] != frame["p"]].value_counts().head(top)
    return [(t, p, int(n), float(n / totals[t])) for (t, p), n in wrong.items()]


def suspected_noise(
    ids: np.ndarray, y: np.ndarray, pred: np.ndarray, confidence: np.ndarray, *, threshold: float, top: int = 15
) -> list[tuple[str, str, int, list[str]]]:
    """Dev ads whose out-of-fold answer (by a model that never saw them) confidently names another class: the pairs
    with the most such ads and a few of their ids (ids, never texts)."""
    flagged = (np.asarray(pred, dtype=str) != np.asarray(y, dtype=str)) & (np.asarray(confidence) >= threshold)
    frame = pd.DataFrame({"id": np.asarray(ids, dtype=str), "y": y, "p": pred})[flagged]
    out = []
    for (label, predicted), group in sorted(frame.groupby(["y", "p"]), key=lambda kv: -len(kv[1]))[:top]:
        out.append((str(label), str(predicted), len(group), group["id"].head(5).tolist()))
    return out


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return '<td class="num" data-v="">–</td>'
    if isinstance(value, int | np.integer):
        return f'<td class="num" data-v="{value}">{value:,}</td>'
    return f'<td class="num" data-v="{float(value):.6g}">{float(value):.{digits}f}</td>'


def _text(value: Any) -> str:
    return f'<td data-v="{_e(value)}">{_e(value)}</td>'


def _inline_markdown(line: str) -> str:
    """The report's markdown lines (bold, code, bullets) as HTML, escaped first."""
    out = _e(line.removeprefix("- "))
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def _image(folder: Path, name: str, alt: str) -> str:
    path = folder / name
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = f'<figcaption class="note">{_e(alt)}</figcaption>'
    return f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}">{caption}</figure>'


def _table(head: list[str], rows: list[str], *, sortable: bool = True, cls: str = "") -> str:
    classes = " ".join(c for c in ("sortable" if sortable else "", cls) if c)
    return (
        f'<table class="{classes}"><thead><tr>'
        + "".join(f"<th>{_e(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def render_page(
    metrics: dict[str, Any],
    *,
    answer: list[str],
    figures_dir: Path,
    names: dict[str, str],
    per_class: pd.DataFrame,
    extras: PageExtras,
    cleaning: str,
    confusion_figure: str,
) -> str:
    """The page (see the module docstring).

    Args:
        metrics: metrics.json's content, ``figures`` included.
        answer: the report's answer lines (markdown: bold, code, bullets).
        figures_dir: the report folder (figure paths in ``metrics["figures"]`` are relative to it).
        names: label -> category name.
        per_class: the winner's per-class table on test (``metrics.per_class_table``).
        extras: confusion pairs and suspected label noise.
        cleaning: the report's one-line cleaning summary.
        confusion_figure: the winner's confusion-matrix figure, relative to ``figures_dir``.
    """
    res, ranking, winner, data = metrics["systems"], metrics["ranking"], metrics["winner"], metrics["data"]
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>jobembed report</title><style>{_STYLE}</style></head><body>",
        "<h1>jobembed report</h1>",
        f'<p class="note">{_e(data["train"])} train, {_e(data["val"])} validation, {_e(data["test"])} test ads; '
        f"{_e(data['classes'])} classes; {_e(data['cv_folds'])}-fold CV over train + validation, reposts in one fold; "
        f"text column <code>{_e(data['text_column'])}</code>.</p>",
        "<h2>Answer</h2>",
        '<div class="answer">'
        + "".join(f"<p>{_inline_markdown(line)}</p>" for line in answer if line.strip())
        + "</div>",
    ]
    rows = []
    for key in ranking:
        r = res[key]
        cv, t, ci = r["cv"]["summary"], r["test"], r["test_ci95"]
        rows.append(
            f'<tr class="{"best" if key == winner else ""}">'
            + _text(r["display"])
            + _num(cv["macro_f1"]["mean"])
            + _num(cv["macro_f1"]["std"])
            + _num(cv["accuracy"]["mean"])
            + _num(t["accuracy"])
            + _text(f"[{ci['accuracy'][0]:.3f}, {ci['accuracy'][1]:.3f}]")
            + _num(t["macro_f1"])
            + _text(f"[{ci['macro_f1'][0]:.3f}, {ci['macro_f1'][1]:.3f}]")
            + _num((r.get("test_parent") or {}).get("accuracy"))
            + "</tr>"
        )
    parts += [
        "<h2>All systems</h2>",
        '<p class="note">Sorted by CV macro-F1 (click a header to sort). Test intervals: 95% bootstrap over repost '
        "groups. Parent: the parent group of the predicted class (where labels nest).</p>",
        _table(
            [
                "system",
                "CV macro-F1",
                "± sd",
                "CV accuracy",
                "test accuracy",
                "95% CI",
                "test macro-F1",
                "95% CI",
                "test parent accuracy",
            ],
            rows,
        ),
        "<h2>Significance against the best system</h2>",
        _table(
            [
                "other system",
                "only best right (test)",
                "only other right (test)",
                "McNemar p",
                "CV macro-F1 diff",
                "corrected t-test p",
            ],
            [
                "<tr>"
                + _text(res[p["b"]]["display"])
                + _num(p["mcnemar_test"]["a_only"])
                + _num(p["mcnemar_test"]["b_only"])
                + _num(p["mcnemar_test"]["p_value"], 4)
                + _num(p["cv_macro_f1_ttest"]["mean_diff"])
                + _num(p["cv_macro_f1_ttest"]["p_value"], 4)
                + "</tr>"
                for p in metrics["pairwise"]
            ],
        ),
    ]
    tuned = [k for k in ranking if res[k].get("versus")]
    if tuned:
        vs_rows = [
            "<tr>"
            + _text(res[k]["display"])
            + _text(res[o]["display"])
            + _num(v["cv_macro_f1_diff"])
            + _num(v["cv_macro_f1_ttest"]["p_value"], 4)
            + _num(v["mcnemar_oof"]["p_value"], 4)
            + _num(v["mcnemar_test"]["p_value"], 4)
            + "</tr>"
            for k in tuned
            for o, v in res[k]["versus"].items()
        ]
        parts += [
            "<h2>Fine-tuned inside the CV</h2>",
            _table(
                [
                    "fine-tuned system",
                    "against",
                    "CV macro-F1 diff",
                    "t-test p",
                    "McNemar p (out-of-fold)",
                    "McNemar p (test)",
                ],
                vs_rows,
            ),
        ]
    pc_rows = [
        "<tr>"
        + _text(row.label)
        + _text(names.get(str(row.label), ""))
        + _num(row.f1)
        + _num(row.precision)
        + _num(row.recall)
        + _num(int(row.support))
        + _num(int(row.predicted))
        + "</tr>"
        for row in per_class.sort_values("support", ascending=False).itertuples()
    ]
    parts += [
        f"<h2>Per class: {_e(res[winner]['display'])}, test split</h2>",
        '<p class="note">Sortable. A class with 1-4 test ads has a noisy F1; the out-of-fold table below is steadier.'
        "</p>",
        _table(["label", "name", "F1", "precision", "recall", "support", "predicted"], pc_rows, cls="per-class"),
    ]
    rare = metrics.get("rare_classes_oof") or {}
    if rare.get("classes"):
        shown = [k for k in ranking if k in rare["systems"]][:4]
        parts += [
            f"<h2>Rare classes (at most {_e(rare['max_ads'])} dev ads): out-of-fold F1</h2>",
            _table(
                ["label", "name", "dev ads", *[res[k]["display"] for k in shown]],
                [
                    "<tr>"
                    + _text(c)
                    + _text(names.get(c, ""))
                    + _num(int(n))
                    + "".join(_num(rare["systems"][k][c]["f1"]) for k in shown)
                    + "</tr>"
                    for c, n in rare["classes"].items()
                ],
            ),
        ]
    parts += [
        "<h2>Confusions</h2>",
        _table(
            ["true", "true name", "predicted", "predicted name", "test ads", "share of the true class"],
            [
                "<tr>"
                + _text(t)
                + _text(names.get(t, ""))
                + _text(p)
                + _text(names.get(p, ""))
                + _num(int(n))
                + _num(share)
                + "</tr>"
                for t, p, n, share in extras.worst_pairs
            ],
        ),
        _image(figures_dir, confusion_figure, f"{res[winner]['display']}: test confusion matrix, row-normalised"),
        "<h2>Knowing when to abstain</h2>",
        _image(figures_dir, "figures/coverage_accuracy.png", "Coverage against accuracy of the answered test ads"),
        _image(figures_dir, "figures/reliability.png", "Reliability of the best system before and after temperature"),
        "<h2>Suspected label noise</h2>",
        f'<p class="note">Dev ads whose out-of-fold answer by {_e(res[winner]["display"])} (a model that never saw '
        f"them or their reposts) names another class with confidence ≥ {extras.noise_confidence:.2f}: candidates for "
        "a second look, by label pair, with a few ad ids.</p>",
        _table(
            ["label", "name", "answered", "answered name", "dev ads", "example ids"],
            [
                "<tr>"
                + _text(label)
                + _text(names.get(label, ""))
                + _text(p)
                + _text(names.get(p, ""))
                + _num(int(n))
                + _text(", ".join(ids))
                + "</tr>"
                for label, p, n, ids in extras.noise
            ],
        ),
        "<h2>Cleaning</h2>",
        f"<p>{_inline_markdown(cleaning)}</p>",
        _image(figures_dir, "figures/cv_macro_f1.png", "CV macro-F1 of every system (mean ± sd)"),
        f"<script>{_SCRIPT}</script></body></html>",
    ]
    return "\n".join(p for p in parts if p)
