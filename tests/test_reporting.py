"""Report text: the table, number and interval formatting every report shares, and findings as records."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import xraylib
from xraylib import reporting
from xraylib.reporting import (
    Finding, format_interval, format_number, markdown_table, probability_column, probability_columns, warning_lines,
)


# ---------------------------------------------------------------------------------------------
# Numbers


@pytest.mark.parametrize("value", [None, math.nan, np.nan, np.float32("nan"), math.inf, -math.inf, pd.NA, pd.NaT])
def test_missing_and_undefined_numbers_read_n_a_never_nan(value):
    assert format_number(value) == "n/a"
    assert format_number(value, style="percent") == "n/a"
    assert format_number(value, style="compact") == "n/a"


def test_fixed_numbers_keep_their_digits_for_floats_ints_and_numpy_scalars():
    assert format_number(0.91234) == "0.912"
    assert format_number(0.91234, 2) == "0.91"
    assert format_number(np.float32(0.5)) == "0.500"
    assert format_number(np.float64(1.0), 4) == "1.0000"
    assert format_number(3) == "3.000"
    assert format_number(np.int64(3), 0) == "3"
    assert format_number("0.25") == "0.250"  # a number read back from text


def test_text_and_bools_are_not_numbers():
    assert format_number("unknown") == "unknown"
    assert format_number(True) == "True"


def test_percent_and_compact_styles():
    assert format_number(0.912, 0, style="percent") == "91%"
    assert format_number(1.0, 0, style="percent") == "100%"
    assert format_number(12.0, style="compact") == "12"
    assert format_number(0.12345, style="compact") == "0.123"
    assert format_number(123.456, style="compact") == "123.5"
    with pytest.raises(ValueError, match="style"):
        format_number(1.0, style="scientific")


# ---------------------------------------------------------------------------------------------
# Intervals


def test_an_interval_with_and_without_a_label():
    assert format_interval(0.91234, (0.85, 0.96)) == "0.912 (0.850–0.960)"
    assert format_interval(0.91234, (0.85, 0.96), 2, label="95% CI") == "0.91 (95% CI 0.85–0.96)"
    assert format_interval(np.float64(1.0), (np.float64(1.0), np.float64(1.0))) == "1.000 (1.000–1.000)"


@pytest.mark.parametrize("interval", [(math.nan, math.nan), (None, None), (0.2, math.nan), None])
def test_a_value_without_its_interval_says_so(interval):
    assert format_interval(0.5, interval) == "0.500 (CI n/a)"


@pytest.mark.parametrize("value", [math.nan, None])
def test_an_undefined_value_reads_undefined(value):
    assert format_interval(value, (0.1, 0.9)) == "n/a (undefined)"


# ---------------------------------------------------------------------------------------------
# Tables


def test_a_table_from_rows_escapes_pipes_and_newlines():
    lines = markdown_table([["a|b", "two\nlines", 3], [None, 0.5, math.nan]], ["name | kind", "text", "n"])
    assert lines == [
        "| name \\| kind | text | n |",
        "|---|---|---|",
        "| a\\|b | two lines | 3 |",
        "| None | 0.5 | n/a |",
    ]


def test_a_table_from_a_data_frame_leaves_the_index_out_and_writes_floats_compactly():
    frame = pd.DataFrame({"source": ["kaggle", "ieee8023"], "images": [10, 2], "share": [0.12345, 1.0],
                          "age": [pd.NA, 45.25]}, index=["x", "y"])
    assert markdown_table(frame) == [
        "| source | images | share | age |",
        "|---|---|---|---|",
        "| kaggle | 10 | 0.123 | n/a |",
        "| ieee8023 | 2 | 1 | 45.2 |",
    ]


def test_a_table_without_rows_is_one_line():
    assert markdown_table(pd.DataFrame(columns=["a", "b"])) == ["(empty)"]
    assert markdown_table([], ["a"], empty="none") == ["none"]
    with pytest.raises(ValueError, match="header"):
        markdown_table([[1, 2]])


# ---------------------------------------------------------------------------------------------
# Findings, disclaimer, prediction columns


def test_a_finding_carries_its_numbers_and_renders_as_a_warning():
    finding = Finding("single_source_class", "all 3 'covid' images come from one source", {"class": "covid", "images": 3},
                      level="shortcut")
    assert finding.to_dict() == {"check": "single_source_class", "level": "shortcut",
                                 "message": "all 3 'covid' images come from one source",
                                 "numbers": {"class": "covid", "images": 3}}
    assert warning_lines([finding]) == ["- **Warning:** all 3 'covid' images come from one source"]
    assert warning_lines(["too few patients"], quote=True) == ["> **Warning:** too few patients"]
    with pytest.raises(ValueError, match="level"):
        Finding("x", "y", level="serious")


def test_one_disclaimer_and_one_probability_column_rule():
    assert xraylib.DISCLAIMER is reporting.DISCLAIMER
    assert reporting.REPORT_DISCLAIMER == "Research software, not a diagnostic device."
    assert probability_column("covid") == "prob_covid"
    assert probability_columns(("normal", "covid")) == ["prob_normal", "prob_covid"]


def test_audit_findings_carry_their_numbers_and_the_model_card_reads_the_level_not_the_words():
    from xraylib import audit, modelcard

    manifest = pd.DataFrame({"path": [f"{i}.png" for i in range(20)], "label": ["normal"] * 10 + ["covid"] * 10,
                             "source": ["kaggle"] * 10 + ["ieee8023"] * 10, "patient_id": [str(i) for i in range(20)]})
    findings = {f.check: f for f in audit.confound_warnings(manifest)}
    single = findings["single_source_class"]
    assert single.level == "shortcut" and single.numbers["images"] == 10 and single.numbers["source"] in ("kaggle", "ieee8023")
    assert findings["source_predicts_label"].numbers == {"accuracy": 1.0, "baseline": 0.5}
    assert audit.source_label_accuracy(manifest)[:2] == (1.0, 0.5)

    shortcut = {"findings": [{"check": "anything", "level": "shortcut", "message": "", "numbers": {}}]}
    caution = {"findings": [{"check": "single_source_class_renamed", "level": "caution", "message": "", "numbers": {}}]}
    assert "shortcut learning" in modelcard._applies_here(None, shortcut, {})
    assert "shortcut learning" not in modelcard._applies_here(None, caution, {})
