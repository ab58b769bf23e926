"""The label taxonomy's texts: read, rolled up to the run's labels, and used as label texts (issue 21)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from jobembed.artifacts import read_json
from jobembed.cli import app
from jobembed.config import load_config
from jobembed.data import label_texts
from jobembed.embed import make_embedders
from jobembed.errors import DataError
from jobembed.sections import TaxonomyConfig
from jobembed.taxonomy import label_text, roll_up
from tests.synthetic import make_ads, make_labels

runner = CliRunner()

ROWS = [
    ("2", "Specjaliści", "name"),  # coarser than every 2-digit label
    ("22", "Specjaliści do spraw zdrowia", "name"),
    ("22", "Diagnozują i leczą", "tasks"),
    ("22", "Zawody medyczne.", "description"),
    ("222", "Pielęgniarki i położne", "name"),
    ("222101", "pielęgniarka", "title"),
    ("61", "Rolnicy", "name"),  # merged into other by prepare
    ("51", "Pracownicy usług osobistych", "name"),  # dropped by prepare
    ("99", "nic", "name"),  # no such label
]


def _frame() -> pd.DataFrame:
    return pd.DataFrame(ROWS, columns=["code", "text", "kind"])


def test_texts_roll_up_by_the_longest_code_prefix_and_say_what_was_left_out(tmp_path):
    config = TaxonomyConfig(path=tmp_path / "t.csv", label_kinds=["name", "description"])
    out, card = roll_up(
        _frame(), labels=["22", "83", "61", "51", "other"], config=config, merged={"61": "other"}, dropped={"51"}
    )
    got = dict(zip(out["text"], out["label"], strict=True))
    assert got["Pielęgniarki i położne"] == "22" and got["pielęgniarka"] == "22" and got["Rolnicy"] == "other"
    assert "Specjaliści" not in got and "nic" not in got and "Pracownicy usług osobistych" not in got
    own = dict(zip(out["text"], out["own"], strict=True))
    assert own["Specjaliści do spraw zdrowia"] and not own["pielęgniarka"] and not own["Rolnicy"]
    assert card["left_out"] == {"coarser_than_labels": 1, "no_label": 1, "class_dropped": 1}
    assert card["merged_into_other"] == 1 and card["rows"] == 6
    assert card["labels_without_text"] == ["61", "83"]  # 61's texts went to other with its ads
    # the label's own texts of the asked kinds, in the asked order; not the finer groups' texts
    assert label_text(out, "22", ["name", "description"]) == "Specjaliści do spraw zdrowia. Zawody medyczne"
    assert label_text(out, "83", ["name"]) == ""


def test_a_map_rolls_up_codes_that_do_not_nest(tmp_path):
    pd.DataFrame({"code": ["X1", "X2"], "label": ["22", "83"]}).to_csv(tmp_path / "map.csv", index=False)
    frame = pd.DataFrame([("X1", "nurse", "name"), ("X2", "driver", "name"), ("X3", "?", "name")], columns=ROWS_COLS)
    config = TaxonomyConfig(path=tmp_path / "t.csv", roll_up="map", map=tmp_path / "map.csv")
    out, card = roll_up(frame, labels=["22", "83"], config=config, merged={}, dropped=set())
    assert out["label"].tolist() == ["22", "83"] and card["left_out"]["no_label"] == 1


ROWS_COLS = ["code", "text", "kind"]


def test_taxonomy_label_text_without_a_taxonomy_is_one_clear_error():
    labels = pd.DataFrame({"label": ["22"], "name": ["Health"], "description": [""]})
    with pytest.raises(DataError, match="read no taxonomy"):
        label_texts(labels, "taxonomy")
    labels["taxonomy"] = [""]
    assert label_texts(labels, "taxonomy") == ["Health"]  # no text of its own: name_description


def test_prepare_reads_the_taxonomy_and_embed_uses_its_label_texts(tmp_path, tiny_encoder_dir):
    make_ads(12, seed=3, rare={"61": 2}).to_csv(tmp_path / "ads.csv", index=False)
    make_labels().to_csv(tmp_path / "labels.csv", index=False)
    _frame().to_csv(tmp_path / "tax.csv", index=False)
    run = tmp_path / "runs" / "tax"
    args = ["prepare", str(run), "--input", str(tmp_path / "ads.csv"), "--id-col", "id"]
    args += ["--labels", str(tmp_path / "labels.csv"), "--labels-description-col", "description"]
    args += ["--min-class-count", "3", "-q"]
    (tmp_path / "tax.yaml").write_text(
        f"prepare:\n  taxonomy:\n    path: {tmp_path / 'tax.csv'}\n    label_kinds: [name, tasks]\n"
        f"embed:\n  model: {tiny_encoder_dir}\n  label_text: taxonomy\n  max_seq_length: 32\n"
    )
    result = runner.invoke(app, [*args, "-c", str(tmp_path / "tax.yaml")])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(run / "prepare" / "taxonomy.parquet")
    assert set(table["label"]) == {"22", "other", "51"}  # 61 merged (2 ads); 51 kept
    labels = {d["label"]: d for d in read_json(run / "prepare" / "labels.json")}
    assert labels["22"]["taxonomy"] == "Specjaliści do spraw zdrowia. Diagnozują i leczą"
    card = read_json(run / "prepare" / "data_card.json")
    assert card["taxonomy"]["merged_into_other"] == 1 and card["taxonomy"]["left_out"]["coarser_than_labels"] == 1
    for split in ("train", "val", "test"):  # never ads
        assert not set(pd.read_parquet(run / "prepare" / f"{split}.parquet")["text"]) & set(table["text"])
    result = runner.invoke(app, ["embed", str(run), "-q"])
    assert result.exit_code == 0, result.output
    own = np.load(next((run / "embed").glob("*/labels.npy")))
    # taxonomy_mean: each label's vector is the mean of its texts' unit vectors, every level below it included
    (tmp_path / "mean.yaml").write_text("embed:\n  label_text: taxonomy_mean\n")
    result = runner.invoke(app, ["embed", str(run), "-c", str(tmp_path / "mean.yaml"), "-q"])
    assert result.exit_code == 0, result.output
    mean = np.load(next((run / "embed").glob("*/labels.npy")))
    order = [d["label"] for d in read_json(run / "prepare" / "labels.json")]
    lines = labels["22"]["taxonomy_texts"].split("\n")
    assert "pielęgniarka" in lines and "Pielęgniarki i położne" in lines  # finer levels too
    _, label_emb = make_embedders(load_config(run / "config.yaml").embed)
    unit = label_emb.encode(lines)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    np.testing.assert_allclose(mean[order.index("22")], unit.mean(axis=0), atol=1e-5)
    assert not np.allclose(mean[order.index("22")], own[order.index("22")])
    # the taxonomy file's content is part of prepare's key: an edit re-runs prepare
    _frame().assign(text=lambda f: f["text"] + "!").to_csv(tmp_path / "tax.csv", index=False)
    result = runner.invoke(app, ["prepare", str(run)])
    assert "prepare: running" in result.output, result.output
    (tmp_path / "tax.csv").unlink()
    result = runner.invoke(app, ["prepare", str(run)])  # what was prepared from it stays, as for a moved input
    assert result.exit_code == 0 and "prepare: up to date" in result.output, result.output
    fresh = ["prepare", str(tmp_path / "runs" / "new"), *args[2:], "-c", str(tmp_path / "tax.yaml")]
    result = runner.invoke(app, fresh)
    assert result.exit_code == 1 and "taxonomy file" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
