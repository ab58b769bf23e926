"""The prepare stage: readers, validation, dedup, near-duplicate groups, rare classes, splits, outputs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from jobembed.data import (
    PrepareResult,
    data_card_table,
    load_label_set,
    load_labels,
    load_splits,
    normalise_for_dedup,
    prepare,
    read_table,
)
from jobembed.errors import ConfigError, DataError
from jobembed.sections import LabelSetConfig, PrepareConfig

REAL_ADS = Path(__file__).resolve().parents[2] / "shared/data/pl-jobads/ads.csv"

# ------------------------------------------------------------------------------------------------ helpers

_RNG = np.random.default_rng(0)
_VOCAB = ["".join(_RNG.choice(list("abcdefghijklmnoprstuwyz"), size=_RNG.integers(3, 9))) for _ in range(3000)]


def random_text(rng: np.random.Generator, n_words: int = 40) -> str:
    """A text that shares (almost) no word bigrams with any other random text."""
    return " ".join(rng.choice(_VOCAB, size=n_words)).capitalize() + "."


def make_ads(counts: dict[str, int], seed: int = 0) -> pd.DataFrame:
    """Distinct random ads: ``counts`` = {label: number of ads}; columns id, text, label, city."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, n in counts.items():
        for _ in range(n):
            rows.append({"id": f"ad{len(rows)}", "text": random_text(rng), "label": label, "city": "Kraków"})
    return pd.DataFrame(rows)


def write(frame: pd.DataFrame, path: Path) -> Path:
    """Write ``frame`` in the format its suffix names."""
    if path.suffix in (".csv", ".tsv"):
        frame.to_csv(path, index=False, sep="\t" if path.suffix == ".tsv" else ",")
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        frame.to_parquet(path, index=False)
    return path


def run(tmp_path: Path, frame: pd.DataFrame | Path, name: str = "ads.csv", **overrides) -> PrepareResult:
    """``prepare`` on ``frame`` (written to ``tmp_path/name``) into ``tmp_path/run/prepare``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = frame if isinstance(frame, Path) else write(frame, tmp_path / name)
    overrides.setdefault("id_col", "id")
    cfg = PrepareConfig(input=path, **overrides)
    return prepare(config=cfg, out_dir=tmp_path / "run" / "prepare", progress=False)


def all_rows(result: PrepareResult) -> pd.DataFrame:
    splits = load_splits(result.out_dir)
    return pd.concat([f.assign(split=name) for name, f in splits.items()], ignore_index=True)


def label_file(tmp_path: Path) -> Path:
    rows = [
        ("major", "1", "Managers", "Plan and direct."),
        ("major", "2", "Professionals", ""),
        ("submajor", "11", "Chief executives", "Run organisations."),
        ("submajor", "12", "", "Administrative managers."),
        ("submajor", "13", "Production managers", "Run production."),
    ]
    frame = pd.DataFrame(rows, columns=["level", "code", "name_en", "description_en"])
    return write(frame, tmp_path / "labels.csv")


# ------------------------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_read_table_round_trips_every_format_as_strings(tmp_path: Path, suffix: str) -> None:
    frame = pd.DataFrame(
        {
            "id": ["a1", "a2", "a3"],
            "text": ["Kierowca, kat. C\nWarszawa", 'Says "hi", then NA', "Zażółć gęślą jaźń"],
            "label": ["NA", "7", " 8 "],
            "note": ["", "NA", "x"],
            "count": [1, 2, 3],
        }
    )
    back = read_table(write(frame, tmp_path / f"ads{suffix}"))
    expected = frame.astype(str)
    assert list(back.columns) == list(expected.columns)
    assert back.to_dict(orient="list") == expected.to_dict(orient="list")
    assert all(pd.api.types.is_string_dtype(back[c]) for c in back.columns)
    assert list(back.attrs["source_rows"]) == ([2, 3, 4] if suffix in (".csv", ".tsv") else [1, 2, 3])


def test_read_table_unknown_suffix_names_accepted_ones(tmp_path: Path) -> None:
    path = tmp_path / "ads.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(DataError, match=r"'\.xlsx'.*\.csv.*\.jsonl.*\.parquet"):
        read_table(path)


def test_read_table_missing_file_names_path_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.csv.*not found.*Fix:"):
        read_table(tmp_path / "nope.csv")


@pytest.mark.parametrize("content", [b"", b"id,text,label\n", b"\n\n"], ids=["zero-bytes", "header-only", "blank"])
def test_read_table_empty_csv_has_no_rows(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "ads.csv"
    path.write_bytes(content)
    with pytest.raises(DataError, match="no rows"):
        read_table(path)


def test_read_table_non_utf8_names_line_and_fix(tmp_path: Path) -> None:
    good = "id,text,label\n1,Kierowca w Gdańsku,83\n2,Księgowa,24\n".encode()
    bad = "3,Magazynier w Łodzi,93\n".encode("cp1250")
    path = tmp_path / "ads.csv"
    path.write_bytes(good + bad + b"4,ok,1\n")
    with pytest.raises(DataError) as err:
        read_table(path)
    message = str(err.value)
    assert "line 4" in message
    assert f"byte offset {len(good) + bad.index(0xA3)}" in message  # Ł in cp1250 is 0xA3
    assert "iconv -f cp1250 -t utf-8" in message


def test_read_table_accepts_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "ads.csv"
    path.write_bytes(b"\xef\xbb\xbfid,text\n1,\xc5\x81\xc3\xb3d\xc5\xba\n")
    assert read_table(path).to_dict(orient="list") == {"id": ["1"], "text": ["Łódź"]}


@pytest.mark.parametrize(
    ("bad_line", "pattern"), [("{not json", "line 3 is not valid JSON"), ("[1, 2]", "line 3 is a JSON list")]
)
def test_read_table_malformed_jsonl_names_line(tmp_path: Path, bad_line: str, pattern: str) -> None:
    path = tmp_path / "ads.jsonl"
    path.write_text('{"text": "a", "label": "1"}\n{"text": "b", "label": "2"}\n' + bad_line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=pattern):
        read_table(path)


# --------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("field", "flag"), [("text_col", "--text-col"), ("label_col", "--label-col"), ("id_col", "--id-col")]
)
def test_missing_column_lists_found_columns_and_flag(tmp_path: Path, field: str, flag: str) -> None:
    with pytest.raises(DataError) as err:
        run(tmp_path, make_ads({"a": 3}), **{field: "missing_col"})
    message = str(err.value)
    assert "'missing_col'" in message
    assert "columns id, text, label, city" in message
    assert flag in message


def test_missing_input_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--input FILE"):
        prepare(config=PrepareConfig(), out_dir=tmp_path / "out", progress=False)


def test_empty_text_and_missing_label_rows_are_dropped_and_counted(tmp_path: Path) -> None:
    frame = make_ads({"a": 6, "b": 6})
    frame.loc[1, "text"] = "   "
    frame.loc[4, "text"] = ""
    frame.loc[7, "label"] = " "
    result = run(tmp_path, frame, test_size=0.5, val_size=0)
    dropped = result.card["rows_dropped"]
    # CSV row numbers count the header as row 1: frame index i is row i + 2.
    assert dropped["empty_text"] == {"count": 2, "rows": [3, 6]}
    assert dropped["missing_label"] == {"count": 1, "rows": [9]}
    assert result.card["rows_kept"] == 9
    assert not {"ad1", "ad4", "ad7"} & set(all_rows(result)["id"])


def test_all_rows_dropped_is_an_error(tmp_path: Path) -> None:
    frame = make_ads({"a": 3}).assign(label="")
    with pytest.raises(DataError, match="all 3 rows were dropped"):
        run(tmp_path, frame)


def test_duplicate_ids_are_an_error_and_missing_ids_are_generated(tmp_path: Path) -> None:
    frame = make_ads({"a": 5, "b": 5})
    frame.loc[3, "id"] = "ad0"
    with pytest.raises(DataError, match=r"id 'ad0' appears more than once \(rows 2, 5\)"):
        run(tmp_path, frame)
    frame.loc[3, "id"] = ""
    ids = set(all_rows(run(tmp_path, frame, test_size=0.5, val_size=0))["id"])
    assert "row-5" in ids
    assert "ad0" in ids


def test_without_id_col_ids_are_row_numbers(tmp_path: Path) -> None:
    frame = make_ads({"a": 5, "b": 5})
    rows = all_rows(run(tmp_path, frame, id_col=None, test_size=0.5, val_size=0))
    assert set(rows["id"]) == {f"row-{i}" for i in range(2, 12)}
    assert "orig_id" in rows.columns  # the file's own "id" column is kept, renamed


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_numeric_labels_are_normalised(tmp_path: Path, suffix: str) -> None:
    frame = make_ads({"x": 10})
    frame["label"] = [7.0] * 5 + [12.0] * 5
    rows = all_rows(run(tmp_path, frame, name=f"ads{suffix}", test_size=0.5, val_size=0))
    assert set(rows["label"]) == {"7", "12"}
    assert [d["label"] for d in json.loads((tmp_path / "run/prepare/labels.json").read_text())] == ["7", "12"]


# ------------------------------------------------------------------------------------------------- dedup


@pytest.mark.parametrize(
    "variant",
    [
        "kierowca   KAT. C,\n praca w Warszawie!! tel. <<PHONE>>, mail <<EMAIL>>",
        "Kierowca kat. C - praca w Warszawie. Tel. +48 601 234 567, mail jan.kowalski@firma.pl",
        "Kierowca kat C praca w Warszawie tel [PHONE] mail <EMAIL>",
        "Kierowca kat. C, praca w Warszawie. Tel. 601-234-567, mail https://firma.pl/kontakt",
    ],
)
def test_normalise_for_dedup_equates_cosmetic_variants(variant: str) -> None:
    original = "Kierowca kat. C, praca w Warszawie. Tel. <<PHONE>>, mail <<EMAIL>>"
    assert normalise_for_dedup(variant) == normalise_for_dedup(original)
    assert normalise_for_dedup(original) == "kierowca kat c praca w warszawie tel _ph_ mail _ph_"


def test_normalise_for_dedup_keeps_real_differences() -> None:
    assert normalise_for_dedup("Kierowca kat. C, 3000 - 4000 zł") != normalise_for_dedup("Kierowca kat. B, 3000 zł")


def test_exact_and_normalised_duplicates_are_removed(tmp_path: Path) -> None:
    frame = make_ads({"a": 10, "b": 10})
    base = frame.loc[0, "text"]
    copies = [
        base,  # exact
        base,  # exact
        "  " + base.upper().replace(" ", "  \n") + "  ",  # case and whitespace
        base.rstrip(".") + " Kontakt: <<PHONE>>",  # placeholder variant ...
        base.rstrip(".") + " kontakt: 600 100 200!",  # ... of a real phone number
    ]
    extra = pd.DataFrame([{"id": f"dup{i}", "text": t, "label": "a", "city": ""} for i, t in enumerate(copies)])
    result = run(tmp_path, pd.concat([frame, extra], ignore_index=True), test_size=0.5, val_size=0)
    card = result.card
    assert card["exact_duplicates_removed"] == 2
    assert card["normalised_duplicates_removed"] == 2
    assert card["rows_kept"] == 21
    rows = all_rows(result)
    assert "ad0" in set(rows["id"])  # the first occurrence is the one kept
    assert not {"dup0", "dup1", "dup2"} & set(rows["id"])


def test_near_identical_repost_is_kept_and_grouped_with_its_original(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    frame = make_ads({"a": 15, "b": 15, "c": 15})
    words = random_text(rng, n_words=120).split()
    edited = list(words)
    edited[60] = "zmieniony"
    reposts = pd.DataFrame(
        [
            {"id": "orig", "text": " ".join(words), "label": "a", "city": ""},
            {"id": "repost", "text": " ".join(edited), "label": "a", "city": ""},
        ]
    )
    result = run(tmp_path, pd.concat([frame, reposts], ignore_index=True))
    rows = all_rows(result).set_index("id")
    assert rows.loc["orig", "group"] == rows.loc["repost", "group"]
    assert rows.loc["orig", "split"] == rows.loc["repost", "split"]
    assert result.card["near_duplicates"] == {
        "threshold": 0.9,
        "groups": 1,
        "rows_in_groups": 2,
        "largest": 2,
        "mixed_label_groups": 0,
    }


@pytest.mark.parametrize(
    ("labels", "policy", "kept"),
    [
        (["a", "b", "b"], "majority", "b"),  # majority wins
        (["b", "a", "a", "b"], "majority", "b"),  # tie: first occurrence
        (["a", "b", "b"], "drop", None),  # the whole group goes
    ],
)
def test_label_conflicts_follow_policy(tmp_path: Path, labels: list[str], policy: str, kept: str | None) -> None:
    frame = make_ads({"a": 8, "b": 8})
    text = random_text(np.random.default_rng(9))
    copies = pd.DataFrame([{"id": f"c{i}", "text": text, "label": lab, "city": ""} for i, lab in enumerate(labels)])
    result = run(
        tmp_path, pd.concat([frame, copies], ignore_index=True), conflict_policy=policy, test_size=0.5, val_size=0
    )
    assert result.card["label_conflicts"]["groups"] == 1
    assert result.card["label_conflicts"]["examples"][0]["labels"] == labels
    rows = all_rows(result)
    survivors = rows[rows["text"] == text]
    if kept is None:
        assert survivors.empty
        assert result.card["rows_dropped"]["label_conflict"]["count"] == len(labels)
    else:
        assert survivors["label"].tolist() == [kept]
        assert survivors["id"].tolist() == [f"c{labels.index(kept)}"]


# ------------------------------------------------------------------------------------------- rare classes


@pytest.mark.parametrize("policy", ["error", "drop", "merge"])
def test_rare_class_policy(tmp_path: Path, policy: str) -> None:
    frame = make_ads({"a": 10, "b": 10, "rare1": 1, "rare2": 2})
    if policy == "error":
        with pytest.raises(
            DataError, match=r"2 classes have fewer than 3 ads.*'rare1' \(1\).*'rare2' \(2\).*--rare-policy"
        ):
            run(tmp_path, frame, min_class_count=3, rare_policy=policy)
        return
    result = run(tmp_path, frame, min_class_count=3, rare_policy=policy, other_label="misc", test_size=0.5, val_size=0)
    assert result.card["rare_classes"]["classes"] == {"rare1": 1, "rare2": 2}
    labels = set(all_rows(result)["label"])
    label_json = {d["label"]: d["name"] for d in load_labels(result.out_dir).to_dict(orient="records")}
    if policy == "drop":
        assert labels == {"a", "b"}
        assert result.card["rows_dropped"]["rare_class"]["count"] == 3
        assert set(label_json) == {"a", "b"}
    else:
        assert labels == {"a", "b", "misc"}
        assert (all_rows(result)["label"] == "misc").sum() == 3
        assert label_json == {"a": "a", "b": "b", "misc": "other"}


# -------------------------------------------------------------------------------------------- label sets


def test_load_label_set_filters_by_level_and_falls_back_to_code(tmp_path: Path) -> None:
    cfg = LabelSetConfig(
        path=label_file(tmp_path), name_col="name_en", description_col="description_en", filter={"level": "submajor"}
    )
    labels = load_label_set(cfg)
    assert labels.to_dict(orient="records") == [
        {"label": "11", "name": "Chief executives", "description": "Run organisations."},
        {"label": "12", "name": "12", "description": "Administrative managers."},
        {"label": "13", "name": "Production managers", "description": "Run production."},
    ]
    no_desc = load_label_set(LabelSetConfig(path=cfg.path, name_col=None, filter={"level": "major"}))
    assert no_desc.to_dict(orient="list") == {"label": ["1", "2"], "name": ["1", "2"], "description": ["", ""]}


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"name_col": "name_pl"}, r"'name_pl' \(labels.name_col\) not found.*level, code, name_en, description_en"),
        ({"filter": {"level": "minor"}}, r"filter level=minor keeps no label rows.*'major', 'submajor'"),
        ({"code_col": "level", "filter": {}}, r"label 'major' is listed more than once \(rows 2, 3\)"),
    ],
)
def test_load_label_set_errors(tmp_path: Path, overrides: dict, pattern: str) -> None:
    settings = {"name_col": "name_en", "filter": {"level": "major"}} | overrides
    cfg = LabelSetConfig(path=label_file(tmp_path), **settings)
    with pytest.raises(DataError, match=pattern):
        load_label_set(cfg)


def test_labels_without_data_are_kept_in_labels_json(tmp_path: Path) -> None:
    frame = make_ads({"11": 10, "13": 10})
    labels = LabelSetConfig(path=label_file(tmp_path), name_col="name_en", filter={"level": "submajor"})
    result = run(tmp_path, frame, labels=labels, test_size=0.5, val_size=0)
    assert load_labels(result.out_dir)["label"].tolist() == ["11", "12", "13"]
    assert result.card["labels_without_data"] == ["12"]
    assert result.card["n_classes"] == 2


def test_unknown_labels_against_label_set_are_an_error(tmp_path: Path) -> None:
    frame = make_ads({"11": 5, "13": 5, "99": 2})
    labels = LabelSetConfig(path=label_file(tmp_path), name_col="name_en", filter={"level": "submajor"})
    with pytest.raises(DataError) as err:
        run(tmp_path, frame, labels=labels)
    message = str(err.value)
    assert "2 rows have 1 label that are not in the label set" in message
    assert "'99' (rows 12, 13)" in message
    assert "drop those rows" in message


def test_zero_overlap_with_label_set_says_so(tmp_path: Path) -> None:
    frame = make_ads({"11": 5, "13": 5})
    labels = LabelSetConfig(path=label_file(tmp_path), name_col="name_en", filter={"level": "major"})
    with pytest.raises(DataError, match=r"none of the 2 data labels is in the label set.*right level/filter"):
        run(tmp_path, frame, labels=labels)


# ---------------------------------------------------------------------------------------------- splitting


def test_splits_are_disjoint_stratified_and_group_aware(tmp_path: Path) -> None:
    frame = make_ads({"a": 30, "b": 20, "c": 10, "d": 5, "e": 2})
    rng = np.random.default_rng(3)
    # three reposts of one ad (one word changed each): one group, so one split
    words = random_text(rng, 100).split()
    for i in range(3):
        edited = list(words)
        edited[10 * i] = f"zmiana{i}"
        frame.loc[len(frame)] = {"id": f"r{i}", "text": " ".join(edited), "label": "a", "city": ""}
    result = run(tmp_path, frame)
    splits = load_splits(result.out_dir)
    ids = [set(f["id"]) for f in splits.values()]
    groups = [set(f["group"]) for f in splits.values()]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not ids[i] & ids[j]
            assert not groups[i] & groups[j]
    assert sum(len(f) for f in splits.values()) == len(frame)
    for label in ("a", "b", "c", "d"):
        assert label in set(splits["train"]["label"])
        assert label in set(splits["test"]["label"])
    assert len(splits["test"]) == pytest.approx(0.2 * len(frame), abs=4)
    assert len(splits["val"]) == pytest.approx(0.1 * len(frame), abs=4)
    assert result.card["splits"]["test"]["class_counts"]["a"] >= 5


def test_split_is_reproducible_per_seed(tmp_path: Path) -> None:
    frame = make_ads({"a": 30, "b": 30})

    def test_ids(seed: int, folder: str) -> set[str]:
        return set(load_splits(run(tmp_path / folder, frame, seed=seed).out_dir)["test"]["id"])

    assert test_ids(1, "one") == test_ids(1, "two")
    assert test_ids(1, "one") != test_ids(2, "three")


def test_val_size_zero_gives_empty_val_with_same_columns(tmp_path: Path) -> None:
    splits = load_splits(run(tmp_path, make_ads({"a": 10, "b": 10}), val_size=0).out_dir)
    assert splits["val"].empty
    assert list(splits["val"].columns) == list(splits["train"].columns)
    assert len(splits["train"]) + len(splits["test"]) == 20


def test_max_rows_takes_a_stratified_subsample(tmp_path: Path) -> None:
    result = run(tmp_path, make_ads({"a": 60, "b": 30, "c": 10}), max_rows=50)
    rows = all_rows(result)
    assert result.card["subsample"] == {"max_rows": 50, "rows_before": 100, "rows_after": len(rows)}
    assert rows["label"].value_counts().to_dict() == {"a": 30, "b": 15, "c": 5}


def test_too_few_groups_to_split_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="only 4 groups"):
        run(tmp_path, make_ads({"a": 2, "b": 2}))


def test_classes_too_small_to_stratify_a_split_is_one_clear_error(tmp_path: Path) -> None:
    """Reproduces: 6 classes of 5-6 ads ended in scikit-learn's bare ValueError (n_splits=8 > members)."""
    with pytest.raises(DataError, match="largest class has 5 ads, too few to stratify a val split"):
        run(tmp_path, make_ads({c: 6 for c in "abcdef"}))


def test_single_class_is_an_error_in_prepare(tmp_path: Path) -> None:
    """Reproduces: single-class data passed prepare and failed two stages later."""
    with pytest.raises(DataError, match="only one class"):
        run(tmp_path, make_ads({"a": 30}))


@pytest.mark.parametrize("shares", [(0.9, 0.9), (0.5, 0.48)])
def test_split_shares_must_leave_training_data(shares: tuple[float, float]) -> None:
    """Reproduces: --test-size 0.9 --val-size 0.9 was accepted and split 25/25/50."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="leave no training share"):
        PrepareConfig(test_size=shares[0], val_size=shares[1])


# ------------------------------------------------------------------------------------------------ outputs


def test_outputs_columns_and_card(tmp_path: Path) -> None:
    result = run(tmp_path, make_ads({"a": 25, "b": 15}))
    out = tmp_path / "run" / "prepare"
    assert result.out_dir == out
    for name in ("train.parquet", "val.parquet", "test.parquet", "labels.json", "data_card.json", "config.yaml"):
        assert (out / name).is_file(), name
    assert result.splits == {name: out / f"{name}.parquet" for name in ("train", "val", "test")}
    assert len(result.card["input_sha256"]) == 64
    assert not (tmp_path / "run" / "manifest.json").exists()  # the engine writes the manifest with the stage's stamp
    splits = load_splits(out)
    for frame in splits.values():
        assert list(frame.columns) == ["id", "text", "label", "group", "city"]
        assert frame["group"].dtype == np.int64
        assert all(pd.api.types.is_string_dtype(frame[c]) for c in ("id", "text", "label", "city"))
    card = json.loads((out / "data_card.json").read_text())
    assert card["rows_read"] == card["rows_kept"] == 40
    assert set(card["splits"]) == {"train", "val", "test"}
    assert set(card["splits"]["train"]["text_chars"]) == {"mean", "median", "p95", "max"}
    assert load_labels(out).to_dict(orient="list") == {"label": ["a", "b"], "name": ["a", "b"], "description": ["", ""]}

    console = Console(record=True, width=120)
    console.print(data_card_table(card))
    text = console.export_text()
    assert "train" in text and "40 rows read" in text
    assert text.index("│ a ") < text.index("│ b ")  # sorted by train count, largest first


def test_load_splits_without_prepare_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="jobembed prepare"):
        load_splits(tmp_path)
    with pytest.raises(DataError, match="jobembed prepare"):
        load_labels(tmp_path)


# --------------------------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_prepare_real_pl_jobads(tmp_path: Path) -> None:
    """The 8,006 real Polish ads: ~10 s on one core (TF-IDF near-duplicates and the group-aware split)."""
    if not REAL_ADS.is_file():
        pytest.skip(f"real data not found at {REAL_ADS} (the shared data folder beside the project)")
    labels = LabelSetConfig(
        path=REAL_ADS.parent / "labels.csv",
        code_col="code",
        name_col="name_en",
        description_col="description_en",
        filter={"level": "isco_submajor"},
    )
    start = time.perf_counter()
    result = run(tmp_path, REAL_ADS, label_col="isco_submajor", labels=labels)
    seconds = time.perf_counter() - start
    card = result.card
    assert card["rows_read"] == 8006
    assert card["exact_duplicates_removed"] + card["normalised_duplicates_removed"] >= 180
    splits = load_splits(result.out_dir)
    groups = [set(f["group"]) for f in splits.values()]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    submajor = load_labels(result.out_dir)
    assert set(submajor["label"]) - {"other"} == {
        str(c) for c in pd.read_csv(labels.path).query("level == 'isco_submajor'").code
    }
    assert len(set(submajor["label"]) - {"other"}) == 39
    assert card["n_classes"] == 39  # 38 submajors with 2+ ads, plus 'other' for the single ad of 95
    print(f"prepare on pl-jobads: {seconds:.1f} s")


@pytest.mark.slow
def test_lsh_groups_agree_with_the_exact_search_on_real_ads() -> None:
    """The MinHash LSH search finds the same repost groups as the exact all-pairs cosine on pl-jobads."""
    if not REAL_ADS.is_file():
        pytest.skip(f"real data not found at {REAL_ADS} (the shared data folder beside the project)")
    from jobembed.dedup import near_duplicate_groups, near_duplicate_groups_exact

    texts = pd.read_csv(REAL_ADS, dtype=str, keep_default_na=False)["text"]
    norm = texts.map(normalise_for_dedup).drop_duplicates().tolist()
    new = near_duplicate_groups(norm, 0.9, progress=False)
    old = near_duplicate_groups_exact(norm, 0.9, progress=False)
    assert (pd.factorize(new)[0] == pd.factorize(old)[0]).all()
    assert (np.bincount(new) > 1).sum() > 300  # real repost groups exist


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lsh_groups_equal_exact_groups_on_edited_copies(seed: int) -> None:
    from jobembed.dedup import near_duplicate_groups, near_duplicate_groups_exact

    rng = np.random.default_rng(seed)
    base = [random_text(rng, n_words=int(rng.integers(30, 150))) for _ in range(150)]
    texts = list(base)
    for i in rng.choice(len(base), 60, replace=False):  # edited reposts: a few words changed or dropped
        words = base[i].split()
        for _ in range(int(rng.integers(1, 4))):
            words[int(rng.integers(len(words)))] = random_text(rng, n_words=1).rstrip(".").lower()
        texts.append(" ".join(words))
    norm = [normalise_for_dedup(t) for t in texts]
    new = near_duplicate_groups(norm, 0.8, progress=False)
    old = near_duplicate_groups_exact(norm, 0.8, progress=False)
    assert (pd.factorize(new)[0] == pd.factorize(old)[0]).all()
    assert (np.bincount(new) > 1).sum() >= 40


def test_non_text_column_is_refused(tmp_path: Path) -> None:
    """Reproduces: a numeric text column in Parquet was embedded as the texts '0', '1', ..."""
    frame = make_ads({"a": 20, "b": 20}).assign(text=lambda f: np.arange(len(f)))
    with pytest.raises(DataError, match="not text"):
        run(tmp_path, frame, name="ads.parquet")


def test_duplicate_column_names_are_refused(tmp_path: Path) -> None:
    """Reproduces: the second of two 'text' columns silently became 'text.1'."""
    (tmp_path / "dup.csv").write_text("id,text,label,text\n1,a,x,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="'text' appears twice"):
        read_table(tmp_path / "dup.csv")


@pytest.mark.parametrize("sep", [";", "\t"])
def test_semicolon_or_tab_separated_csv_is_detected(tmp_path: Path, sep: str) -> None:
    """Reproduces: a semicolon file got 'check quoting' advice instead of being read (or told the delimiter)."""
    frame = make_ads({"a": 20, "b": 20})
    frame.to_csv(tmp_path / "ads.csv", sep=sep, index=False)
    back = read_table(tmp_path / "ads.csv")
    assert list(back.columns) == list(frame.columns) and back.attrs["delimiter"] == sep
    assert len(run(tmp_path, tmp_path / "ads.csv").card["splits"]["train"]) > 0


def test_missing_labels_file_is_named_as_such(tmp_path: Path) -> None:
    """Reproduces: a missing --labels file was reported as a missing INPUT."""
    labels = LabelSetConfig(path=tmp_path / "nope.csv")
    with pytest.raises(DataError, match=r"--labels \(prepare.labels.path\) file not found"):
        run(tmp_path, make_ads({"a": 20, "b": 20}), labels=labels)


def test_read_table_parquet_missing_values_and_types_become_strings(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {"text": ["a", None, "c"], "score": [1.5, np.nan, 3.0], "flag": [True, False, True], "n": [1, 2, 3]}
    )
    back = read_table(write(frame, tmp_path / "ads.parquet"))
    assert back.to_dict(orient="list") == {
        "text": ["a", "", "c"],
        "score": ["1.5", "", "3.0"],
        "flag": ["true", "false", "true"],
        "n": ["1", "2", "3"],
    }


@pytest.mark.parametrize(
    "text",
    [
        "WWW.Example.com/x <<EMAIL>> a@b.pl tel 123 456 789",
        "Http://x.y  \u00a0 z\u2003w\n\n[PHONE] <ORG> x",
        "Kierowca kat. C+E – 5 000 zł; kontakt: <<PHONE>>, jan.kowalski@firma.pl, https://firma.pl/praca?id=1",
        "no markers at all, just words and 12 digits 1234567890",
    ],
)
def test_fast_normalisation_equals_the_plain_one(text: str) -> None:
    from jobembed.dedup import _normalise_reference

    assert normalise_for_dedup(text) == _normalise_reference(text)


@pytest.mark.slow
def test_fast_normalisation_equals_the_plain_one_on_every_real_ad() -> None:
    if not REAL_ADS.is_file():
        pytest.skip(f"real data not found at {REAL_ADS} (the shared data folder beside the project)")
    from jobembed.dedup import _normalise_reference

    texts = pd.read_csv(REAL_ADS, dtype=str, keep_default_na=False)["text"]
    assert [normalise_for_dedup(t) for t in texts] == [_normalise_reference(t) for t in texts]


@pytest.mark.parametrize("chunk", [3, 7, 64])
def test_utf8_check_in_chunks_finds_the_first_bad_byte(tmp_path: Path, chunk: int) -> None:
    from jobembed.tables import _check_utf8

    good = "id,text\n1,Księgowa źdźbło\n".encode()
    (tmp_path / "ok.csv").write_bytes(good)
    _check_utf8(tmp_path / "ok.csv", chunk=chunk)  # multi-byte characters cut by chunk boundaries are fine
    (tmp_path / "bad.csv").write_bytes(good + b"2,Ksi\xea\n")
    with pytest.raises(DataError, match=r"byte 0xea on line 3, column 6"):
        _check_utf8(tmp_path / "bad.csv", chunk=chunk)
    (tmp_path / "cut.csv").write_bytes(good + "ą".encode()[:1])
    with pytest.raises(DataError, match="line 3"):
        _check_utf8(tmp_path / "cut.csv", chunk=chunk)
