"""Report text: the one home of the disclaimer, number and interval formatting, Markdown tables and findings.

The audit, the evaluation, the shortcut tests and the model card all write Markdown; they format
numbers, intervals and tables through the functions here, so that a value reads the same in every
report ("n/a" for a missing or undefined number, never "nan"). A check's result is a
:class:`Finding` record (check name, level, numbers, message): the prose is rendered from it, and a
reader such as the model card reads the numbers and the check name, not the words.

Pure Python: no NumPy, pandas or TensorFlow import (NumPy scalars and DataFrames are handled by
duck typing), so ``import xraylib`` stays light.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

__all__ = [
    "DISCLAIMER", "REPORT_DISCLAIMER", "MISSING", "FINDING_LEVELS", "Finding",
    "probability_column", "probability_columns", "is_missing", "format_number", "format_interval",
    "markdown_table", "warning_lines",
]

#: The full disclaimer: printed by the notebooks, the CLI and the web app, and written into every JSON report.
DISCLAIMER = (
    "xraylib is research software, not a diagnostic device. Its models and numbers must not be "
    "used to diagnose, treat or triage anyone."
)
#: The one-line disclaimer at the top of every Markdown report.
REPORT_DISCLAIMER = "Research software, not a diagnostic device."
#: How a missing or undefined number is written.
MISSING = "n/a"
#: What a :class:`Finding`'s ``level`` says: "shortcut" (something other than the disease tells the
#: classes apart), "leak" (the test set holds pictures or patients seen in training), "caution"
#: (something that could not be checked, or does not carry over elsewhere), "ok" (a test passed).
FINDING_LEVELS = ("shortcut", "leak", "caution", "ok")


# ---------------------------------------------------------------------------------------------
# Prediction tables


def probability_column(class_name: str) -> str:
    """The prediction table's probability column of a class: ``prob_<class>``."""
    return f"prob_{class_name}"


def probability_columns(classes: Iterable[str]) -> list[str]:
    """``prob_<class>`` for each class, in order."""
    return [probability_column(c) for c in classes]


# ---------------------------------------------------------------------------------------------
# Numbers


def is_missing(value: Any) -> bool:
    """True for ``None``, NaN, infinities, ``pd.NA`` and ``pd.NaT``: values a report writes as "n/a"."""
    if value is None:
        return True
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return not math.isfinite(float(value))
    return type(value).__name__ in ("NAType", "NaTType")


def format_number(value: Any, digits: int = 3, style: str = "fixed") -> str:
    """A number as report text; "n/a" when missing or undefined (see :func:`is_missing`).

    ``style``: "fixed" (``digits`` decimals: 0.912), "percent" (``digits`` decimals of a share:
    0.912 -> "91%"), or "compact" for table cells of mixed sizes (whole numbers without decimals,
    3 significant digits below 10, one decimal from 10). Text that is not a number is returned
    as it is.
    """
    if is_missing(value):
        return MISSING
    if isinstance(value, bool):
        return str(value)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(value):
        return MISSING
    if style == "percent":
        return f"{value:.{digits}%}"
    if style == "compact":
        return f"{value:g}" if value.is_integer() else f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    if style != "fixed":
        raise ValueError(f"style must be 'fixed', 'percent' or 'compact', got {style!r}")
    return f"{value:.{digits}f}"


def format_interval(value: Any, interval: Sequence[Any] | None, digits: int = 3, label: str = "") -> str:
    """A value with its interval: "0.912 (95% CI 0.850–0.960)" with ``label="95% CI"``, else "0.912 (0.850–0.960)".

    An undefined value reads "n/a (undefined)"; a value whose interval is missing or undefined
    reads "0.912 (CI n/a)", so a bare number never passes for one with an interval.
    """
    if is_missing(value):
        return f"{MISSING} (undefined)"
    shown = format_number(value, digits)
    low, high = interval if interval is not None else (None, None)
    if is_missing(low) or is_missing(high):
        return f"{shown} (CI {MISSING})"
    prefix = f"{label} " if label else ""
    return f"{shown} ({prefix}{format_number(low, digits)}–{format_number(high, digits)})"


# ---------------------------------------------------------------------------------------------
# Markdown


def _cell(value: Any) -> str:
    """A table cell: floats in the compact style, other values as text; pipes escaped, newlines joined."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return format_number(value, style="compact")
    if type(value).__name__ in ("NAType", "NaTType"):
        return MISSING
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Any, header: Sequence[Any] | None = None, empty: str = "(empty)") -> list[str]:
    """A Markdown table as lines: ``rows`` a DataFrame (its columns are the header, its index left
    out) or a sequence of rows with ``header``. Floats are written in the compact style of
    :func:`format_number` (format them first for other styles); "|" in a cell is escaped and a
    newline becomes a space. A table without rows is the one line ``empty``."""
    if hasattr(rows, "columns") and hasattr(rows, "itertuples"):
        header = list(rows.columns) if header is None else header
        rows = [tuple(row) for row in rows.itertuples(index=False)]
    if header is None:
        raise ValueError("markdown_table needs a header for rows that are not a DataFrame")
    rows = list(rows)
    if not rows:
        return [empty]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


# ---------------------------------------------------------------------------------------------
# Findings


@dataclass(frozen=True)
class Finding:
    """One result of a check, as a record: the message is rendered from the numbers.

    ``check``: the check's name (e.g. ``"single_source_class"``); ``message``: the plain-words
    sentence; ``numbers``: what the sentence says in figures (shares, counts, AUCs, the class and
    source concerned), for readers that need them rather than the words; ``level``: one of
    :data:`FINDING_LEVELS`.
    """

    check: str
    message: str
    numbers: dict[str, Any] = field(default_factory=dict)
    level: str = "caution"

    def __post_init__(self) -> None:
        if self.level not in FINDING_LEVELS:
            raise ValueError(f"Finding level must be one of {FINDING_LEVELS}, got {self.level!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "level": self.level, "message": self.message, "numbers": dict(self.numbers)}


def warning_lines(findings: Iterable[Finding | str], quote: bool = False) -> list[str]:
    """One Markdown line per finding (or message): "- **Warning:** ..." or, with ``quote``, "> **Warning:** ..."."""
    mark = ">" if quote else "-"
    return [f"{mark} **Warning:** {f.message if isinstance(f, Finding) else f}" for f in findings]
