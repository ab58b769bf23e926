"""Span scoring and gold-file reading for `jobembed clean eval` (jobembed.clean.spans)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from jobembed.clean.spans import GoldDoc, Span, dedupe_spans, read_gold_jsonl, span_scores
from jobembed.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("JOBEMBED_DATA", ROOT.parent / "shared" / "data"))
DA_TEST = DATA / "da-kompetencer" / "test.jsonl"


def skill(start: int, end: int, label: str = "skill") -> Span:
    return Span(start, end, label)


# --- span_scores ------------------------------------------------------------------------------------------------


def test_exact_and_overlap_scores_by_hand():
    # gold: [0,5) [10,20) skill; pred: [0,5) exact hit, [12,18) overlaps [10,20), [30,35) misses everything
    gold = [[skill(0, 5), skill(10, 20)]]
    pred = [[skill(0, 5), skill(12, 18), skill(30, 35)]]
    scores = span_scores(gold, pred)
    exact, overlap = scores["exact"]["micro"], scores["overlap"]["micro"]
    assert (exact["tp"], exact["fp"], exact["fn"], exact["support"]) == (1, 2, 1, 2)
    assert exact["precision"] == pytest.approx(1 / 3) and exact["recall"] == pytest.approx(1 / 2)
    assert exact["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert (overlap["tp"], overlap["fp"], overlap["fn"]) == (2, 1, 0)
    assert overlap["precision"] == pytest.approx(2 / 3) and overlap["recall"] == 1.0
    assert overlap["f1"] == pytest.approx(0.8)


def test_overlap_matching_is_one_to_one():
    # two predictions over one gold span: one true positive, one false positive
    scores = span_scores([[skill(0, 10)]], [[skill(0, 5), skill(3, 10)]])["overlap"]["micro"]
    assert (scores["tp"], scores["fp"], scores["fn"]) == (1, 1, 0)
    assert scores["precision"] == 0.5 and scores["recall"] == 1.0
    # one long prediction over two gold spans: one true positive, one false negative
    scores = span_scores([[skill(0, 4), skill(6, 10)]], [[skill(0, 10)]])["overlap"]["micro"]
    assert (scores["tp"], scores["fp"], scores["fn"]) == (1, 0, 1)


def test_overlap_matching_prefers_the_larger_overlap():
    # greedy by overlap length: [0,10) takes gold [2,10) (8 chars), so [9,12) can still take gold [10,12)
    scores = span_scores([[skill(2, 10), skill(10, 12)]], [[skill(0, 10), skill(9, 12)]])["overlap"]["micro"]
    assert scores["tp"] == 2


def test_labels_must_agree_and_macro_averages_over_labels():
    gold = [[skill(0, 5), skill(10, 15, "knowledge")]]
    pred = [[skill(0, 5, "knowledge"), skill(10, 15, "knowledge")]]
    scores = span_scores(gold, pred)
    per = scores["exact"]["per_label"]
    assert per["skill"]["tp"] == 0 and per["skill"]["fn"] == 1 and per["skill"]["fp"] == 0
    assert per["knowledge"]["tp"] == 1 and per["knowledge"]["fp"] == 1
    assert scores["labels"] == ["knowledge", "skill"]
    assert scores["exact"]["macro"]["f1"] == pytest.approx((per["knowledge"]["f1"] + per["skill"]["f1"]) / 2)


def test_label_map_renames_predictions_and_unknown_labels_are_ignored():
    gold = [[skill(0, 5)], [skill(2, 8)]]
    pred = [[skill(0, 5, "kompetence"), skill(7, 9, "sted")], [skill(2, 8, "kompetence")]]
    scores = span_scores(gold, pred, label_map={"kompetence": "skill"})
    assert scores["exact"]["micro"]["f1"] == 1.0
    assert scores["ignored_predictions"] == 1 and scores["documents"] == 2
    assert span_scores(gold, pred)["exact"]["micro"]["tp"] == 0  # without the map nothing matches


def test_explicit_labels_and_empty_inputs_score_zero_not_nan():
    scores = span_scores([[]], [[]], labels=["skill"])
    assert scores["exact"]["micro"] == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "tp": 0,
        "fp": 0,
        "fn": 0,
        "support": 0,
    }
    assert span_scores([], [])["labels"] == []


def test_gold_and_pred_must_have_the_same_number_of_documents():
    with pytest.raises(ValueError, match="documents"):
        span_scores([[skill(0, 1)]], [])


# --- dedupe_spans -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spans", "text", "expected"),
    [
        ([skill(0, 5), skill(0, 5)], None, [skill(0, 5)]),  # exact duplicate
        ([skill(0, 10), skill(2, 5)], None, [skill(0, 10)]),  # nested in a longer span of the same label
        ([skill(0, 10), skill(2, 5, "knowledge")], None, [skill(0, 10), skill(2, 5, "knowledge")]),  # other label
        ([skill(0, 5), skill(3, 8)], None, [skill(0, 5), skill(3, 8)]),  # partial overlap stays
        ([skill(7, 13), skill(0, 6)], "Python python", [skill(7, 13)]),  # same text up to case: first kept
        ([Span(0, 6, "skill", "SQL  x"), Span(9, 14, "skill", "sql x")], None, [Span(0, 6, "skill", "SQL  x")]),
    ],
)
def test_dedupe_spans(spans, text, expected):
    assert dedupe_spans(spans, text=text) == expected


# --- read_gold_jsonl --------------------------------------------------------------------------------------------


def test_read_gold_jsonl_reads_offsets_and_skips_blank_lines(tmp_path):
    path = tmp_path / "gold.jsonl"
    rows = [
        {
            "id": "a",
            "text": "Du kan Python og SQL.",
            "spans": [{"start": 7, "end": 13, "label": "skill", "text": "Python"}],
        },
        {"text": "Ingen spans her.", "spans": []},
    ]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n", encoding="utf-8")
    docs = read_gold_jsonl(path)
    assert docs == [
        GoldDoc("a", "Du kan Python og SQL.", (Span(7, 13, "skill", "Python"),)),
        GoldDoc("line-3", "Ingen spans her.", ()),
    ]


BAD_SPAN = {"start": 0, "end": 3, "label": "skill"}


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('{"id": "x", "text": "abc" "spans": []}', "JSON"),
        (json.dumps({"id": "x", "spans": []}), "`text`"),
        (json.dumps({"id": "x", "text": "abc"}), "`spans`"),
        (json.dumps({"id": "x", "text": "abc", "spans": [{"end": 2, "label": "skill"}]}), "`start`"),
        (json.dumps({"id": "x", "text": "abc", "spans": [{**BAD_SPAN, "label": ""}]}), "`label`"),
        (json.dumps({"id": "x", "text": "abc", "spans": [{**BAD_SPAN, "start": 2, "end": 1}]}), "`start`/`end`"),
        (json.dumps({"id": "x", "text": "abc", "spans": [{**BAD_SPAN, "start": 1, "end": 1}]}), "`start`/`end`"),
        (json.dumps({"id": "x", "text": "abc", "spans": [{**BAD_SPAN, "end": 9}]}), "`start`/`end`"),
        (json.dumps({"id": "x", "text": "abc", "spans": [{**BAD_SPAN, "text": "abd"}]}), "`text`"),
    ],
)
def test_bad_gold_lines_raise_data_error_naming_line_and_field(tmp_path, line, field):
    path = tmp_path / "gold.jsonl"
    good = json.dumps({"id": "ok", "text": "abc", "spans": [BAD_SPAN]})
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_gold_jsonl(path)
    message = str(e.value)
    assert f"{path}:2" in message and field in message and "Fix:" in message
    assert "\n" not in message


def test_missing_gold_file_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_gold_jsonl(tmp_path / "nope.jsonl")


@pytest.mark.skipif(not DA_TEST.is_file(), reason=f"real data not found at {DA_TEST} (set JOBEMBED_DATA)")
def test_real_danish_gold_file_reads_and_scores_perfectly_against_itself():
    docs = read_gold_jsonl(DA_TEST)
    assert len(docs) == 1123
    assert all(d.text[s.start : s.end] == s.text for d in docs for s in d.spans)
    assert {s.label for d in docs for s in d.spans} == {"skill", "knowledge"}
    gold = [d.spans for d in docs]
    scores = span_scores(gold, gold)
    assert scores["exact"]["micro"]["f1"] == 1.0 and scores["overlap"]["macro"]["f1"] == 1.0
