"""Issue 21's levers on the systems: the taxonomy's texts as weighted training rows, and the top-down hierarchy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.utils.class_weight import compute_class_weight
from typer.testing import CliRunner

from jobembed.artifacts import read_json
from jobembed.baselines import CentroidClassifier, balanced_sample_weight
from jobembed.bundle import load_bundle, save_bundle
from jobembed.cli import app
from jobembed.config import PipelineConfig
from jobembed.embed import Embedder, RunVectors
from jobembed.errors import DataError
from jobembed.evaluate import EvalSettings, ExtraRows, System, evaluate_systems, extra_rows, fit_on_train
from jobembed.head import HeadInputError, MLPHead
from jobembed.hybrid import TfidfLogReg
from jobembed.sections import HybridConfig
from jobembed.topdown import TopDownHead
from tests.conftest import encoder_info
from tests.synthetic import OCCUPATIONS, make_ads, make_labels
from tests.test_quality import CODES, HEAD, TFIDF, WORDS, _data, _splits

runner = CliRunner()
PARENTS = {"11": "1", "12": "1", "21": "2", "22": "2"}


# ------------------------------------------------------------------------------ sample weights


def test_balanced_sample_weight_is_sklearns_balanced_for_unit_weights():
    y = np.array(["a"] * 5 + ["b"] * 2 + ["c"])
    expected = dict(zip("abc", compute_class_weight("balanced", classes=np.array(list("abc")), y=y), strict=True))
    np.testing.assert_allclose(balanced_sample_weight(y, np.ones(len(y))), [expected[c] for c in y])
    # a class counted by its rows' total weight: three rows at 1/3 weigh as much as one row at 1
    w = balanced_sample_weight(np.array(["a", "b", "b", "b"]), np.array([1, 1 / 3, 1 / 3, 1 / 3]))
    assert w[0] == pytest.approx(w[1:].sum())


def test_rows_of_weight_zero_teach_the_mlp_nothing():
    X, y, _ = _data(30, seed=1)
    X_val, y_val, _ = _data(10, seed=2)
    X_test, y_test, _ = _data(20, seed=3)
    wrong = np.roll(np.asarray(CODES), 1)[np.searchsorted(CODES, y)]  # every row relabelled to another class
    noisy_X, noisy_y = np.concatenate([X, X, X]), np.concatenate([y, wrong, wrong])
    accuracy = {}
    for weight in (0.0, 1.0):
        w = np.concatenate([np.ones(len(y)), np.full(2 * len(y), weight)])
        head = MLPHead.from_config(HEAD).fit(noisy_X, noisy_y, X_val=X_val, y_val=y_val, sample_weight=w)
        accuracy[weight] = float((head.predict(X_test) == y_test).mean())
    assert accuracy[0.0] > 0.8 and accuracy[1.0] < accuracy[0.0] - 0.2, accuracy
    with pytest.raises(HeadInputError, match="needs X_val"):
        MLPHead.from_config(HEAD).fit(X, y, sample_weight=np.ones(len(y)))


def test_weighted_centroids_and_tfidf_follow_the_weights():
    X = np.array([[1, 0], [0, 1], [1, 0]], dtype=np.float32)
    model = CentroidClassifier().fit(X, np.array(["a", "a", "b"]), sample_weight=np.array([1.0, 0.0, 1.0]))
    np.testing.assert_allclose(model.prototypes_[0], [1, 0], atol=1e-6)  # the weight-0 row left the mean
    texts, y = ["kierowca", "kierowca", "pielęgniarka", "pielęgniarka"], ["83", "83", "22", "22"]
    plain = TfidfLogReg(config=TFIDF).fit(texts * 3, y * 3)
    ones = TfidfLogReg(config=TFIDF).fit(texts * 3, y * 3, sample_weight=np.ones(12))
    np.testing.assert_allclose(plain.predict_proba(texts), ones.predict_proba(texts), atol=1e-6)


# ------------------------------------------------------------------------------ taxonomy rows in evaluation


def _taxonomy(n_per_class: int = 6, *, seed: int = 5) -> tuple[pd.DataFrame, np.ndarray]:
    """Taxonomy rows for CODES (texts with the class words) and their vectors, far from every ad (so a test can
    tell them from ads wherever they turn up)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(CODES, n_per_class)
    table = pd.DataFrame(
        {
            "code": labels,
            "text": [f"{WORDS[c]} nazwa {i}" for i, c in enumerate(labels)],
            "kind": np.where(np.arange(len(labels)) % 2 == 0, "name", "tasks"),
            "label": labels,
            "own": True,
        }
    )
    centers = np.random.default_rng(99).normal(size=(len(CODES), 12)) * 2.0
    vectors = (centers[np.searchsorted(CODES, labels)] + 50.0 + rng.normal(size=(len(labels), 12))).astype(np.float32)
    return table, vectors


def _config(**report) -> PipelineConfig:
    config = PipelineConfig.model_validate({"text_column": "text", "report": {"cv_folds": 3, "bootstrap": 0, **report}})
    return config.model_copy(update={"head": HEAD, "report": config.report.model_copy(update={"tfidf": TFIDF})})


def test_taxonomy_rows_train_every_fit_and_are_never_held_out(monkeypatch):
    splits, vectors = _splits()
    table, tax_vectors = _taxonomy()
    vectors = RunVectors(**{**vectors.__dict__, "taxonomy": tax_vectors})
    config = _config(systems=["mlp", "fusion", "topdown"], taxonomy_rows={"kinds": ["name"], "weight": 0.5})
    extra = extra_rows(config, table)
    assert extra is not None and len(extra.rows) == len(table) // 2 and extra.kinds == ("name",)
    seen = []
    original = MLPHead.fit

    def spy(self, X, y, **kwargs):
        seen.append((np.asarray(X), kwargs.get("X_val"), kwargs.get("sample_weight")))
        return original(self, X, y, **kwargs)

    monkeypatch.setattr(MLPHead, "fit", spy)
    labels = pd.DataFrame({"label": CODES, "name": CODES, "description": [""] * 4})
    result = evaluate_systems(
        settings=EvalSettings.of(config, extra), splits=splits, labels=labels, vectors={"enc": vectors}, progress=False
    )
    far = 25.0  # taxonomy vectors sit around +50, ads around 0
    assert seen
    for X, X_val, weight in seen:
        assert X_val is not None and (np.asarray(X_val).mean(axis=1) < far).all()  # no taxonomy row is validation
        tax = X.mean(axis=1) > far
        assert tax.sum() == len(extra.rows)  # every fit trains on them, once
        assert weight is not None and np.allclose(weight[tax], 0.5) and np.allclose(weight[~tax], 1.0)
    m = result.metrics
    assert m["taxonomy_rows"]["rows"] == len(extra.rows) and m["taxonomy_rows"]["weight"] == 0.5
    assert set(m["rare_classes_oof"]["classes"]) <= set(CODES)


def test_fusion_with_taxonomy_rows_takes_its_class_prior_from_the_ads_only():
    """report's fusion with report.hybrid.prior_power: the taxonomy rows train it but make no part of the prior
    (their class shares are the taxonomy's, and the prior counts what the portal's ads look like)."""
    splits, vectors = _splits()
    table, tax_vectors = _taxonomy(30)  # many rows per class: with them in the prior it would be flat
    vectors = RunVectors(**{**vectors.__dict__, "taxonomy": tax_vectors})
    config = _config(systems=["fusion"], taxonomy_rows={"weight": 1.0})
    config = config.model_copy(
        update={"report": config.report.model_copy(update={"hybrid": HybridConfig(prior_power=0.4)})}
    )
    settings = EvalSettings.of(config, extra_rows(config, table))
    labels = pd.DataFrame({"label": CODES, "name": CODES, "description": [""] * 4})
    _, model = fit_on_train(System("fusion", vectors, "enc"), settings=settings, labels=labels, splits=splits)
    counts = np.array([(splits["train"]["label"] == c).sum() + 1 for c in CODES], dtype=float)
    assert model.prior_power_ == 0.4
    np.testing.assert_allclose(model.class_prior_, counts / counts.sum())


def test_taxonomy_rows_teach_a_class_that_has_no_training_ad():
    """A class without training ads: its taxonomy rows make it predictable."""
    splits, vectors = _splits()
    train = splits["train"]
    idx = np.flatnonzero((train["label"] != "22").to_numpy())
    splits = {**splits, "train": train.iloc[idx].reset_index(drop=True)}
    vectors = RunVectors(**{**vectors.__dict__, "train": vectors.train[idx]})
    table, _ = _taxonomy(20)
    centers = np.random.default_rng(99).normal(size=(len(CODES), 12)) * 2.0
    rng = np.random.default_rng(4)
    near = (centers[np.searchsorted(CODES, table["label"])] + rng.normal(size=(len(table), 12))).astype(np.float32)
    vectors = RunVectors(**{**vectors.__dict__, "taxonomy": near})
    labels = pd.DataFrame({"label": CODES, "name": CODES, "description": [""] * 4})
    recall = {}
    for rows in (None, {"weight": 1.0}):
        config = _config(systems=["centroid"], taxonomy_rows=rows)
        settings = EvalSettings.of(config, extra_rows(config, table))
        pred, _ = fit_on_train(System("centroid", vectors, "enc"), settings=settings, labels=labels, splits=splits)
        y = splits["test"]["label"].to_numpy()
        recall[bool(rows)] = float((pred[y == "22"] == "22").mean())
    assert recall == {False: 0.0, True: pytest.approx(1.0, abs=0.2)}, recall


def test_taxonomy_rows_without_a_taxonomy_or_of_unknown_kinds_are_one_clear_error():
    config = _config(taxonomy_rows={"kinds": ["nothing"]})
    with pytest.raises(DataError, match="read no taxonomy"):
        extra_rows(config, None)
    with pytest.raises(DataError, match="match no taxonomy row") as err:
        extra_rows(config, _taxonomy()[0])
    assert "kinds name, tasks" in str(err.value)
    splits, vectors = _splits()  # vectors without taxonomy vectors: the fix is to re-run embed
    extra = ExtraRows(rows=np.arange(2), texts=["a", "b"], labels=np.array(["11", "12"]), weight=1.0)
    labels = pd.DataFrame({"label": CODES, "name": CODES, "description": [""] * 4})
    with pytest.raises(DataError, match="jobembed report"):
        fit_on_train(
            System("mlp", vectors, "enc"), settings=EvalSettings.of(_config(), extra), labels=labels, splits=splits
        )


# ------------------------------------------------------------------------------ top-down


@pytest.mark.parametrize("base", ["mlp", "fusion"])
def test_top_down_multiplies_the_parent_and_the_class_within_it(base, tmp_path):
    X, y, texts = _data(30, seed=1)
    X_val, y_val, texts_val = _data(10, seed=2)
    model = TopDownHead(base=base, head=HEAD, tfidf=TFIDF).fit(
        X, y, texts=texts, parents=PARENTS, X_val=X_val, y_val=y_val, texts_val=texts_val
    )
    X_test, y_test, texts_test = _data(20, seed=3)
    proba = model.predict_proba(X_test, texts=texts_test)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    # summed within each parent, the classes give back the parent model's answer
    parent = model.parent_model_
    p_parent = parent.predict_proba(X_test) if base == "mlp" else parent.predict_proba(X_test, texts=texts_test)
    by_parent = np.stack([proba[:, [PARENTS[c] == p for c in model.classes_]].sum(axis=1) for p in parent.classes_], 1)
    np.testing.assert_allclose(by_parent, p_parent, atol=1e-5)
    assert (model.predict(X_test, texts=texts_test) == y_test).mean() > 0.6
    model.save(tmp_path / "td")
    again = TopDownHead.load(tmp_path / "td", device="cpu")
    np.testing.assert_allclose(again.predict_proba(X_test, texts=texts_test), proba, atol=1e-6)
    assert not any(p.suffix in {".pkl", ".pickle", ".joblib"} for p in (tmp_path / "td").rglob("*"))


def test_top_down_holds_out_one_slice_for_both_models():
    X, y, texts = _data(30, seed=1)
    groups = np.arange(len(y)) // 2
    model = TopDownHead(base="mlp", head=HEAD).fit(X, y, texts=texts, parents=PARENTS, groups=groups)
    assert model.class_model_.calibration_["n_val"] == model.parent_model_.calibration_["n_val"] > 0


def test_a_top_down_bundle_classifies_like_the_fitted_head(tiny_encoder_dir, tmp_path):
    config = PipelineConfig.model_validate(
        {"text_column": "text", "embed": {"model": str(tiny_encoder_dir), "max_seq_length": 64}}
    )
    ads = make_ads(12, seed=4)
    embedder = Embedder(config.embed, prompt=None)
    texts, y = ads["text"].tolist(), ads["label"].to_numpy(dtype=str)
    X = embedder.encode(texts)
    parents = {c: c[0] for c in set(y)}
    model = TopDownHead(base="fusion", head=HEAD, tfidf=TFIDF).fit(X, y, texts=texts, parents=parents)
    labels = make_labels().rename(columns={"code": "label"})[["label", "name"]].assign(description="")
    path = save_bundle(
        tmp_path / "bundle", model=model, system="topdown", encoder=encoder_info(embedder, str(tiny_encoder_dir)),
        config=config, labels=labels,
    )  # fmt: skip
    bundle = load_bundle(path, device="cpu")
    assert bundle.meta.head.kind == "topdown"
    np.testing.assert_allclose(bundle.predict_proba(texts), model.predict_proba(X, texts=texts), atol=1e-5)


# ------------------------------------------------------------------------------ the pipeline


def _taxonomy_run(tmp_path: Path, name: str, *, n_ads: int, encoder: Path, rows: list[tuple], labels: bool = True):
    """ads.csv, labels.csv (optional) and tax.csv in ``tmp_path``, and the base config of a run that reads them."""
    make_ads(n_ads, seed=3).to_csv(tmp_path / "ads.csv", index=False)
    prepare = {"input": str(tmp_path / "ads.csv"), "id_col": "id", "taxonomy": {"path": str(tmp_path / "tax.csv")}}
    if labels:
        make_labels().to_csv(tmp_path / "labels.csv", index=False)
        prepare["labels"] = {"path": str(tmp_path / "labels.csv")}
    pd.DataFrame(rows, columns=["code", "text", "kind"]).to_csv(tmp_path / "tax.csv", index=False)
    return {
        "name": name,
        "runs_dir": str(tmp_path / "runs"),
        "text_column": "text",
        "prepare": prepare,
        "embed": {"model": str(encoder), "max_seq_length": 32},
    }


def test_a_run_with_a_taxonomy_trains_on_its_rows_and_bundles_top_down(tmp_path, tiny_encoder_dir):
    """prepare reads the taxonomy, embed encodes its texts, report trains on them (never holding them out) and
    ranks topdown with the rest, bundle serves what won."""
    kinds = ["name", "title", "title", "tasks", "tasks"]
    rows = [(code, word, kinds[i % 5]) for code, (_, words) in OCCUPATIONS.items() for i, word in enumerate(words)]
    config = _taxonomy_run(tmp_path, "tax", n_ads=14, encoder=tiny_encoder_dir, rows=rows) | {
        "head": {"hidden_sizes": [16], "max_epochs": 20, "patience": 5},
        "report": {
            "systems": ["centroid", "mlp", "topdown"],
            "cv_folds": 2,
            "bootstrap": 0,
            "topdown_base": "mlp",
            "taxonomy_rows": {"kinds": ["name", "title"], "weight": 0.5},
        },
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["run", "--config", str(tmp_path / "run.yaml"), "-q"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tax"
    (folder,) = (run / "embed" / "taxonomy").glob("*.npy")
    table = pd.read_parquet(run / "prepare" / "taxonomy.parquet")
    assert np.load(folder).shape[0] == len(table)
    metrics = read_json(run / "report" / "metrics.json")
    assert metrics["taxonomy_rows"]["rows"] == int(table["kind"].isin(["name", "title"]).sum())
    assert any(r["system"] == "topdown" for r in metrics["systems"].values())
    report = (run / "report" / "report.md").read_text()
    assert "## Taxonomy rows" in report and "never in a validation slice" in report
    ok = runner.invoke(app, ["classify", "kierowca kat. C, transport", "--runs-dir", str(tmp_path / "runs"), "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output.strip().splitlines()[-1])["label"] in set(table["label"])


def test_label_positives_read_the_runs_category_texts_in_the_ads_language(tmp_path, tiny_encoder_dir):
    """--positive label trained on English label-set descriptions; with a taxonomy and embed.label_text taxonomy
    they are the label's own (Polish) taxonomy texts, and a run made without changes keeps its triplets' key."""
    rows = [(code, words[0], "name") for code, (_, words) in OCCUPATIONS.items()]
    base = _taxonomy_run(tmp_path, "pos", n_ads=12, encoder=tiny_encoder_dir, rows=rows) | {
        "triplets": {"judge": "none", "positive": "label", "relative_margin": 1.0, "min_anchors_per_class": 2},
    }
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(base))
    run = tmp_path / "runs" / "pos"
    assert runner.invoke(app, ["triplets", str(run), "-c", str(tmp_path / "a.yaml"), "-q"]).exit_code == 0
    english = set(pd.read_parquet(run / "triplets" / "train.parquet")["positive"])
    assert english and english <= set(make_labels()["name"])  # the label set's English names
    (tmp_path / "b.yaml").write_text("embed:\n  label_text: taxonomy\n")
    result = runner.invoke(app, ["triplets", str(run), "-c", str(tmp_path / "b.yaml"), "-q"])
    assert result.exit_code == 0 and "triplets: running" in result.output, result.output
    own = set(pd.read_parquet(run / "triplets" / "train.parquet")["positive"])
    assert own and own <= {words[0] for _, words in OCCUPATIONS.values()}


def test_the_embed_stage_can_run_the_encoder_as_int8_onnx_and_the_bundle_follows(tmp_path, tiny_encoder_dir):
    """embed.backend (issue 22, item 4): explicit and keyed; the bundle encodes new ads as its vectors were made."""
    make_ads(12, seed=2).to_csv(tmp_path / "ads.csv", index=False)
    make_labels().to_csv(tmp_path / "labels.csv", index=False)
    config = {
        "name": "int8",
        "runs_dir": str(tmp_path / "runs"),
        "text_column": "text",
        "prepare": {
            "input": str(tmp_path / "ads.csv"),
            "id_col": "id",
            "labels": {"path": str(tmp_path / "labels.csv")},
        },
        "embed": {"model": str(tiny_encoder_dir), "max_seq_length": 32},
        "head": {"hidden_sizes": [16], "max_epochs": 10, "patience": 3},
        "report": {"systems": ["mlp"], "cv_folds": 2, "bootstrap": 0},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "runs" / "int8"
    result = runner.invoke(app, ["embed", str(run), "-c", str(tmp_path / "run.yaml")])
    hint = "embed.backend onnx-int8 (--backend onnx-int8) encoded 1.8x faster"
    assert result.exit_code == 0 and hint in " ".join(result.output.split()), result.output  # torch on a CPU: a hint
    (folder,) = (run / "embed").glob("*/")
    torch_train = np.load(folder / "train.npy")
    result = runner.invoke(app, ["embed", str(run), "--backend", "onnx-int8"])
    assert result.exit_code == 0 and "embed: running" in result.output, result.output
    assert "encoded 1.8x faster" not in result.output
    assert read_json(folder / "embeddings.json")["backend"] == "onnx-int8"
    int8_train = np.load(folder / "train.npy")
    cosine = (torch_train * int8_train).sum(axis=1)
    assert not np.allclose(torch_train, int8_train) and cosine.min() > 0.95
    assert runner.invoke(app, ["bundle", str(run), "-q"]).exit_code == 0
    assert read_json(run / "bundle" / "bundle.json")["encoder"]["backend"] == "onnx-int8"
    assert load_bundle(run / "bundle", device="cpu").backend == "onnx-int8"


def test_turning_taxonomy_rows_on_re_embeds_but_keeps_the_triplets(tmp_path, tiny_encoder_dir):
    """Reproduces: the taxonomy's vectors sat inside the encoder's folder (and were made for any run with a taxonomy),
    so turning taxonomy rows on, or only adding a taxonomy for label texts, changed what triplets reads and re-ran it
    (and the fine-tune after it). Now they are encoded only for taxonomy rows, beside the encoder's folder."""
    rows = [(code, words[0], "name") for code, (_, words) in OCCUPATIONS.items()]
    base = _taxonomy_run(tmp_path, "keys", n_ads=10, encoder=tiny_encoder_dir, rows=rows, labels=False) | {
        "triplets": {"judge": "none", "relative_margin": 1.0, "min_anchors_per_class": 2},
    }
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(base))
    run = tmp_path / "runs" / "keys"
    assert runner.invoke(app, ["triplets", str(run), "-c", str(tmp_path / "a.yaml"), "-q"]).exit_code == 0
    assert not (run / "embed" / "taxonomy").exists()  # a taxonomy alone (label texts) encodes no rows
    (tmp_path / "b.yaml").write_text("report:\n  taxonomy_rows: {weight: 0.5}\n")
    result = runner.invoke(app, ["embed", str(run), "-c", str(tmp_path / "b.yaml"), "-q"])
    assert result.exit_code == 0 and "embed: running" in result.output, result.output
    assert list((run / "embed" / "taxonomy").glob("*.npy"))
    result = runner.invoke(app, ["triplets", str(run), "-q"])
    assert result.exit_code == 0 and "triplets: up to date" in result.output, result.output
