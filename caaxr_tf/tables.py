"""Plain tables: CSV text and the mean ± std result tables of CV and the protocols.

Core helpers below every other layer (moved from ``caaxr_tf.cv`` and ``caaxr_tf.evaluate``,
which re-export them)."""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Iterable, Mapping, Sequence


AGGREGATES = ("mean", "std")


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def summarize(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per model: ``{"n": folds ok, "folds": folds tried, column: (mean, std, count)}``.

    Only successful fold rows count; ``std`` is the sample standard deviation (n − 1), None
    when fewer than two values exist.
    """
    summary: dict[str, dict[str, Any]] = {}
    for row in rows:
        if str(row.get("fold")) in AGGREGATES:
            continue
        entry = summary.setdefault(str(row["model"]), {"n": 0, "folds": 0, "_rows": []})
        entry["folds"] += 1
        if row.get("status") == "ok":
            entry["n"] += 1
            entry["_rows"].append(row)
    for entry in summary.values():
        fold_rows = entry.pop("_rows")
        for column in columns:
            values = [v for v in (_number(r.get(column)) for r in fold_rows) if v is not None]
            mean = sum(values) / len(values) if values else None
            std = (
                math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                if len(values) > 1 else None
            )
            entry[column] = (mean, std, len(values))
    return summary


def format_mean_std(mean: float | None, std: float | None, digits: int = 3) -> str:
    """``0.912 ± 0.013``; just the mean with one value; ``–`` without any."""
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_results_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[tuple[str, str]],
    *,
    markdown: bool = True,
    digits: int = 3,
) -> str:
    """One line per model with mean ± std over its successful folds for each (column, header).

    ``rows`` are fold rows as written to results.csv (aggregate rows are ignored);
    ``columns`` e.g. ``paper_columns(task, class_names, subsets)``. Markdown table or plain
    aligned text.
    """
    summary = summarize(rows, [key for key, _ in columns])
    header = ["model", "folds", *(title for _, title in columns)]
    body = [
        [model, str(entry["n"]) if entry["n"] == entry["folds"] else f"{entry['n']} of {entry['folds']}",
         *(format_mean_std(entry[key][0], entry[key][1], digits) for key, _ in columns)]
        for model, entry in summary.items()
    ]
    return render_table(header, body, markdown=markdown, text_columns=2)


def render_table(header: Sequence[str], body: Sequence[Sequence[str]], *, markdown: bool, text_columns: int = 1) -> str:
    """A Markdown table (the first ``text_columns`` left-aligned, the rest right-aligned) or
    plain aligned text with a dashed rule under the header (first column left-aligned)."""
    if markdown:
        rule = "|" + "|".join(["---"] * text_columns + ["---:"] * (len(header) - text_columns)) + "|"
        lines = ["| " + " | ".join(header) + " |", rule]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths)))
             for cells in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()
