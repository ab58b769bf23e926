"""The quality issue: hybrid heads, the label hierarchy, abstention and calibration, chunked encoding."""

import copy
import json

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from jobembed import metrics
from jobembed.baselines import tfidf_logreg
from jobembed.bundle import load_bundle, save_bundle
from jobembed.cli import app
from jobembed.config import PipelineConfig
from jobembed.embed import Embedder, RunVectors
from jobembed.errors import BundleError, JobembedError
from jobembed.evaluate import EvalSettings, evaluate_systems
from jobembed.head import MLPHead
from jobembed.hierarchy import find_hierarchy
from jobembed.hybrid import HybridHead, TfidfLogReg
from jobembed.sections import ClassifyConfig, EmbedConfig, HeadConfig, HybridConfig, TfidfConfig
from tests.conftest import encoder_info
from tests.synthetic import make_ads, make_labels

TFIDF = TfidfConfig(max_features=500)
HEAD = HeadConfig(hidden_sizes=[16], max_epochs=60, patience=10, learning_rate=3e-3, device="cpu")
CODES = ["11", "12", "21", "22"]  # two parents (1, 2) with two children each
WORDS = {"11": "dyrektor zarząd", "12": "kierownik sprzedaży", "21": "fizyk laboratorium", "22": "inżynier budowa"}


def _data(n_per_class=40, *, seed=0, text_signal=True, vector_signal=True):
    """Texts and vectors for CODES; either carries the class, or is noise."""
    rng = np.random.default_rng(seed)
    y = np.repeat(CODES, n_per_class)
    rng.shuffle(y)
    filler = ["oferta", "praca", "umowa", "premia", "zespół", "biuro", "miasto", "etat"]
    # The class words name the right class 3 times in 4 (else another class's): informative, not separable.
    named = [c if rng.random() < 0.75 else rng.choice(CODES) for c in y]
    texts = [
        (WORDS[c] + " " if text_signal else "") + " ".join(rng.choice(filler, 4)) + f" x{rng.integers(10**6)}"
        for c in named
    ]
    # The same class centres for every seed, so a fresh draw is a test set of the same problem.
    centers = np.random.default_rng(99).normal(size=(len(CODES), 12)) * (2.0 if vector_signal else 0.0)
    X = (centers[np.searchsorted(CODES, y)] + rng.normal(size=(len(y), 12))).astype(np.float32)
    return X, y, texts


@pytest.fixture(scope="module")
def fitted_hybrids():
    """One fusion and one stack head on the same data, fitted once per module and deep-copied by tests."""
    X, y, texts = _data()
    return {
        mode: HybridHead(mode=mode, head=HEAD, tfidf=TFIDF, hybrid=HybridConfig(stack_folds=3)).fit(X, y, texts=texts)
        for mode in ("fusion", "stack")
    }, (X, y, texts)


# ----------------------------------------------------------------------------------- TF-IDF + LR


@pytest.mark.parametrize("n_classes", [2, 4])
def test_tfidf_logreg_matches_scikit_learn_and_round_trips_without_pickle(tmp_path, n_classes):
    _, y, texts = _data()
    keep = np.isin(y, CODES[:n_classes])
    texts, y = [t for t, k in zip(texts, keep, strict=True) if k], y[keep]
    ours = TfidfLogReg(config=TFIDF).fit(texts, y)
    theirs = tfidf_logreg(TFIDF).fit(texts, y)
    np.testing.assert_allclose(ours.predict_proba(texts), theirs.predict_proba(texts), atol=1e-10)
    ours.save(tmp_path / "t")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["tfidf.json", "tfidf.safetensors"]
    loaded = TfidfLogReg.load(tmp_path / "t")
    np.testing.assert_allclose(loaded.predict_proba(texts), ours.predict_proba(texts), atol=1e-12)


def test_a_tfidf_fit_on_the_same_inputs_is_made_once_and_each_keeps_its_own_temperature(monkeypatch):
    """report fits the same TF-IDF + LR for fusion on every encoder of a fold: the second is the first's parts."""
    from jobembed import hybrid

    calls = []
    real = hybrid.tfidf_logreg
    monkeypatch.setattr(hybrid, "tfidf_logreg", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(hybrid, "_FITS", type(hybrid._FITS)())
    _, y, texts = _data()
    first = TfidfLogReg(config=TFIDF).fit(texts, y)
    second = TfidfLogReg(config=TFIDF).fit(texts, y)
    assert len(calls) == 1 and second.coef_ is first.coef_
    first.calibrate(texts[:40], y[:40])
    assert second.temperature_ == 1.0 != first.temperature_
    with pytest.raises(ValueError, match="read-only"):
        second.coef_ += 1  # shared parts cannot be changed through one of their users
    TfidfLogReg(config=TFIDF).fit(texts[1:], y[1:])  # other rows: a fit of its own
    TfidfLogReg(config=TFIDF, random_state=14).fit(texts, y)  # another seed too
    assert len(calls) == 3
    np.testing.assert_allclose(second.predict_proba(texts), real(TFIDF).fit(texts, y).predict_proba(texts), atol=1e-10)


def test_tfidf_file_edited_is_refused(tmp_path):
    _, y, texts = _data(10)
    TfidfLogReg(config=TFIDF).fit(texts, y).save(tmp_path / "t")
    (tmp_path / "t" / "tfidf.safetensors").write_bytes(b"x" * 100)
    with pytest.raises(BundleError, match="corrupt"):
        TfidfLogReg.load(tmp_path / "t")


# ----------------------------------------------------------------------------------------- hybrid


@pytest.mark.parametrize(
    ("text_signal", "vector_signal", "expect"),
    [(True, False, "tfidf"), (False, True, "mlp")],
)
def test_fusion_weight_follows_the_informative_part(text_signal, vector_signal, expect):
    X, y, texts = _data(text_signal=text_signal, vector_signal=vector_signal)
    model = HybridHead(mode="fusion", head=HEAD, tfidf=TFIDF).fit(X, y, texts=texts)
    curve = {r["weight"]: r["val_nll"] for r in model.fusion_curve_}
    assert len(curve) == len(HybridConfig().fusion_weights)
    # w = 1 is TF-IDF alone, w = 0 the MLP alone: validation prefers the informative one, and so does the choice
    assert (curve[1.0] < curve[0.0]) == (expect == "tfidf")
    assert curve[model.weight_] == min(curve.values())
    Xt, yt, tt = _data(40, seed=1, text_signal=text_signal, vector_signal=vector_signal)
    alone = model.tfidf_.predict(tt) if expect == "tfidf" else model.mlp_.predict(Xt)
    assert (model.predict(Xt, texts=tt) == yt).mean() >= (alone == yt).mean() - 0.05 > 0.5  # chance is 0.25


def test_stacking_features_are_out_of_fold():
    """Each text is unique noise: a model that saw a row memorises it, one that did not is at chance."""
    _, y, texts = _data(text_signal=False, vector_signal=False)
    model = HybridHead(mode="stack", head=HEAD, tfidf=TFIDF)
    model.classes_ = np.unique(y)
    model.tfidf_ = None
    oof = model._out_of_fold(texts, y, np.arange(len(y)), folds=4, seed=0)
    true_col = np.searchsorted(model.classes_, y)
    oof_true = np.exp(oof[np.arange(len(y)), true_col]).mean()
    in_sample = TfidfLogReg(config=TFIDF).fit(texts, y).predict_proba(texts)[np.arange(len(y)), true_col].mean()
    assert oof_true < 0.35 < 0.6 < in_sample  # chance is 0.25


@pytest.mark.parametrize("mode", ["fusion", "stack"])
def test_hybrid_round_trips_with_json_and_safetensors_only(fitted_hybrids, tmp_path, mode):
    models, (X, y, texts) = fitted_hybrids
    model = copy.deepcopy(models[mode])
    model.save(tmp_path / "h")
    files = {p.suffix for p in (tmp_path / "h").rglob("*") if p.is_file()}
    assert files == {".json", ".safetensors"}
    loaded = HybridHead.load(tmp_path / "h", device="cpu")
    np.testing.assert_allclose(loaded.predict_proba(X, texts=texts), model.predict_proba(X, texts=texts), atol=1e-6)
    assert (model.predict(X, texts=texts) == y).mean() > 0.7


def test_fusion_prior_correction_divides_by_the_ads_class_shares(tmp_path):
    """prior_power a: fusion's probabilities over the training ads' (add-one) class shares to the power a; rows
    outside prior_rows (taxonomy texts) are trained on but make no prior; saved as format 2, read back the same."""
    X, y, texts = _data(40)
    keep = (y != "22") | (np.cumsum(y == "22") <= 6)  # class 22 rare: 6 ads against 40
    X, y, texts = X[keep], y[keep], [t for t, k in zip(texts, keep, strict=True) if k]
    extra = 60  # rows of class 11 that are not ads: they must not make 11 look frequent
    X_all = np.concatenate([X, X[y == "11"][:1].repeat(extra, 0)])
    y_all, texts_all = np.concatenate([y, ["11"] * extra]), texts + ["dyrektor zarząd"] * extra
    ads = np.arange(len(y_all)) < len(y)
    X_val, y_val, texts_val = _data(10, seed=2)
    model = HybridHead(mode="fusion", head=HEAD, tfidf=TFIDF, hybrid=HybridConfig(prior_power=0.5)).fit(
        X_all, y_all, texts=texts_all, X_val=X_val, y_val=y_val, texts_val=texts_val, prior_rows=ads
    )
    counts = np.array([(y == c).sum() + 1 for c in CODES], dtype=float)
    np.testing.assert_allclose(model.class_prior_, counts / counts.sum())
    X_test, _, texts_test = _data(30, seed=3)
    plain = copy.deepcopy(model)
    plain.prior_power_ = 0.0
    p0, p1 = plain.predict_proba(X_test, texts=texts_test), model.predict_proba(X_test, texts=texts_test)
    expected = p0 / model.class_prior_**0.5
    np.testing.assert_allclose(p1, expected / expected.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-9)
    rare = CODES.index("22")
    assert (p1[:, rare] >= p0[:, rare] - 1e-12).all() and (p1[:, rare] > p0[:, rare]).any()  # the rare class gains
    model.save(tmp_path / "h")
    meta = json.loads((tmp_path / "h" / "hybrid.json").read_text())
    assert meta["format"] == "jobembed-hybrid/2" and meta["prior_power"] == 0.5
    loaded = HybridHead.load(tmp_path / "h", device="cpu")
    np.testing.assert_allclose(loaded.predict_proba(X_test, texts=texts_test), p1, atol=1e-6)
    plain.save(tmp_path / "p")  # no correction: the file as it was before the correction existed
    meta = json.loads((tmp_path / "p" / "hybrid.json").read_text())
    assert meta["format"] == "jobembed-hybrid/1" and not {"prior_power", "class_prior"} & set(meta)
    broken = json.loads((tmp_path / "h" / "hybrid.json").read_text())
    (tmp_path / "h" / "hybrid.json").write_text(json.dumps(broken | {"class_prior": [0.5, 0.5]}))
    with pytest.raises(BundleError, match="class_prior does not match"):
        HybridHead.load(tmp_path / "h", device="cpu")


def test_hybrid_needs_as_many_texts_as_rows(fitted_hybrids):
    models, (X, _y, texts) = fitted_hybrids
    with pytest.raises(JobembedError, match="texts"):
        models["fusion"].predict_proba(X, texts=texts[:-1])


# -------------------------------------------------------------------------------------- hierarchy


@pytest.mark.parametrize(
    ("labels", "n_parents", "note"),
    [
        (["11", "12", "21", "other"], 2, "'other' has no parent"),
        (["Drivers", "Nurses"], 0, "flat"),
        (["1", "2", "3"], 0, "flat"),
        (["11", "123"], 0, "flat"),
    ],
)
def test_hierarchy_by_code_prefix_or_flat(labels, n_parents, note):
    h = find_hierarchy(labels)
    assert len(set(h.parents.values())) == n_parents and note in h.note
    assert h.flat == (n_parents == 0)
    if not h.flat:
        assert list(h.parent_of(["12", "other"])) == ["1", "other"]


def test_parent_loss_head_records_its_hierarchy_and_round_trips(tmp_path):
    X, y, _ = _data()
    parents = find_hierarchy(CODES).parents
    flat = MLPHead.from_config(HEAD).fit(X, y)
    hier = MLPHead.from_config(HEAD.model_copy(update={"parent_weight": 1.0})).fit(X, y, parents=parents)
    assert hier.parents_ == parents and flat.parents_ == {}
    assert not np.allclose(hier.predict_proba(X), flat.predict_proba(X))  # the second loss changed training
    hier.save(tmp_path / "h")
    loaded = MLPHead.load(tmp_path / "h", device="cpu")
    assert loaded.parents_ == parents and loaded.parent_weight == 1.0
    np.testing.assert_allclose(loaded.predict_proba(X), hier.predict_proba(X), atol=1e-6)


# ------------------------------------------------------------------------------------- abstention


def test_coverage_curve_and_threshold_for_a_target_accuracy():
    classes = ["a", "b"]
    conf = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6])
    proba = np.stack([conf, 1 - conf], axis=1)  # always predicts "a"
    y = np.array(["a", "a", "a", "b", "a", "b"])  # right, right, right, wrong, right, wrong
    curve = metrics.coverage_curve(y, proba, classes, n_points=6)
    assert curve["coverage"] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])
    assert curve["accuracy"] == pytest.approx([1, 1, 1, 0.75, 0.8, 4 / 6])
    assert metrics.threshold_for_accuracy(y, proba, classes, 0.8) == pytest.approx(0.7)  # 4 of 5 answered right
    assert metrics.threshold_for_accuracy(y, proba, classes, 1.0) == pytest.approx(0.9)
    assert metrics.selective_at(y, proba, classes, 0.9) == {"coverage": 0.5, "accuracy": 1.0, "answered": 3}
    conf_right = metrics.confidence_and_correct(y, proba, classes)
    assert metrics.threshold_from_scores(*conf_right, 0.8) == pytest.approx(0.7)
    assert metrics.threshold_from_scores(*conf_right, 1.01) is None
    assert metrics.threshold_from_scores([0.9, 0.9, 0.5], [True, False, True], 0.6) == 0.5  # ties kept together


def test_stacking_folds_keep_reposts_together_when_a_validation_split_is_given(monkeypatch):
    """Reproduces: with a validation split, evaluate passed no groups, so the stack's out-of-fold TF-IDF features of
    an ad came from a model that had seen its repost (one group per row)."""
    from jobembed.evaluate import System, fit_on_train

    splits, vectors = _splits()
    for frame in splits.values():
        frame["group"] = np.arange(len(frame)) // 3 + 1000 * len(frame)  # reposts in threes
    seen = []
    original = HybridHead._out_of_fold

    def spy(self, texts, y, groups, **kwargs):
        seen.append(np.asarray(groups))
        return original(self, texts, y, groups, **kwargs)

    monkeypatch.setattr(HybridHead, "_out_of_fold", spy)
    config = PipelineConfig.model_validate({"text_column": "text", "report": {"hybrid": {"stack_folds": 3}}})
    config = config.model_copy(update={"head": HEAD, "report": config.report.model_copy(update={"tfidf": TFIDF})})
    labels = pd.DataFrame({"label": CODES, "name": CODES, "description": [""] * 4})
    fit_on_train(System("stack", vectors, "enc"), settings=EvalSettings.of(config), labels=labels, splits=splits)
    assert len(seen) == 1 and (seen[0] == splits["train"]["group"].to_numpy()).all()


# ------------------------------------------------------------------------------ report


def _splits(seed=0):
    X, y, texts = _data(30, seed=seed)
    frame = pd.DataFrame({"id": [f"ad{i}" for i in range(len(y))], "text": texts, "label": y})
    frame["group"] = np.arange(len(frame))
    n = len(frame)
    cut = {"train": slice(0, n // 2), "val": slice(n // 2, 2 * n // 3), "test": slice(2 * n // 3, n)}
    splits = {k: frame.iloc[s].reset_index(drop=True) for k, s in cut.items()}
    vectors = RunVectors("enc", "f" * 16, "fp32", None, *(X[s] for s in cut.values()), np.zeros((4, 12), np.float32))
    return splits, vectors


def test_report_scores_hybrids_parents_and_abstention_on_the_same_splits():
    splits, vectors = _splits()
    config = PipelineConfig.model_validate(
        {
            "text_column": "text",
            "report": {
                "systems": ["tfidf", "mlp", "fusion", "stack", "hier"],
                "cv_folds": 3,
                "bootstrap": 20,
                "tfidf": {"max_features": 500},
                "hybrid": {"stack_folds": 3},
                "target_accuracy": 0.95,
            },
            "head": {"hidden_sizes": [16], "max_epochs": 30, "patience": 5},
        }
    )
    labels = pd.DataFrame({"label": CODES, "name": CODES, "description": [""] * 4})
    result = evaluate_systems(
        settings=EvalSettings.of(config), splits=splits, labels=labels, vectors={"enc": vectors}, progress=False
    )
    m = result.metrics
    assert m["hierarchy"]["parents"] == {"11": "1", "12": "1", "21": "2", "22": "2"}
    for key, r in m["systems"].items():
        assert len(r["cv"]["folds"]) == 3 and "parent_macro_f1" in r["cv"]["summary"]
        assert r["test_parent"]["accuracy"] >= r["test"]["accuracy"]  # a right class has the right parent
        sel = r["selective"]
        assert sel["target_accuracy"] == 0.95 and len(sel["oof_curve"]["coverage"]) > 0
        if sel["threshold"] is not None:
            assert sel["oof"]["accuracy"] >= 0.95
        assert 0 <= sel["calibration"]["ece_test"] <= 1
        if r["system"] in ("fusion", "stack"):
            assert key in result.models and isinstance(result.models[key], HybridHead)
    (fusion,) = [r for r in m["systems"].values() if r["system"] == "fusion"]
    assert fusion["fusion_weight"] in HybridConfig().fusion_weights


def test_the_abstention_threshold_is_chosen_on_out_of_fold_answers():
    """Reproduces: the threshold came from the validation split, which had stopped the MLP early, calibrated it
    and picked the fusion weight, so its confidences were optimistic. It is now the one at which every dev ad,
    answered by the CV fold model that did not see it, reaches the target."""
    from jobembed.evaluate import _fit_predict, cv_folds, predict_proba

    splits, vectors = _splits()
    config = PipelineConfig.model_validate(
        {
            "text_column": "text",
            "report": {"systems": ["centroid", "mlp", "fusion"], "cv_folds": 3, "bootstrap": 0, "target_accuracy": 0.8},
        }
    )
    config = config.model_copy(update={"head": HEAD, "report": config.report.model_copy(update={"tfidf": TFIDF})})
    labels = pd.DataFrame({"label": CODES, "name": CODES, "description": [""] * 4})
    result = evaluate_systems(
        settings=EvalSettings.of(config), splits=splits, labels=labels, vectors={"enc": vectors}, progress=False
    )
    dev = pd.concat([splits["train"], splits["val"]], ignore_index=True)
    X_dev, y_dev = np.concatenate([vectors.train, vectors.val]), dev["label"].to_numpy(dtype=str)
    from jobembed.evaluate import build_systems

    settings = EvalSettings.of(config)
    for system in build_systems(settings, {"enc": vectors}):
        conf, right = np.zeros(len(dev)), np.zeros(len(dev), dtype=bool)
        for tr, te in cv_folds(dev, n_folds=3, seed=config.prepare.seed):
            texts = dev["text"].iloc[te].tolist()
            _, model = _fit_predict(
                system, settings=settings, labels=labels, dev=dev, X_dev=X_dev, train_idx=tr, val_idx=None,
                X_eval=X_dev[te], texts_eval=texts,
            )  # fmt: skip
            conf[te], right[te] = metrics.confidence_and_correct(
                y_dev[te], predict_proba(system, model, X_dev[te], texts), model.classes_
            )
        sel = result.metrics["systems"][system.key]["selective"]
        assert sel["chosen_on"] == "out-of-fold"
        assert sel["threshold"] == metrics.threshold_from_scores(conf, right, 0.8)
        np.testing.assert_array_equal(result.oof[system.key][0], conf)


# --------------------------------------------------------------------------------------- bundles


def info_of(bundle):
    from jobembed.bundle import EncoderInfo

    e = bundle.meta.encoder
    return EncoderInfo(e.source_ref, e.fingerprint, e.precision, e.text_prompt, e.max_seq_length)


def bundle_config(bundle):
    return PipelineConfig.model_validate(
        {"text_column": "text", "embed": {"model": bundle.meta.encoder.source_ref, "max_seq_length": 64}}
    )


def _bundle_setup(tiny_encoder_dir, tmp_path, mode):
    config = PipelineConfig.model_validate(
        {"text_column": "text", "embed": {"model": str(tiny_encoder_dir), "max_seq_length": 64}}
    )
    ads = make_ads(12, seed=4)
    embedder = Embedder(config.embed, prompt=None)
    texts, y = ads["text"].tolist(), ads["label"].to_numpy(dtype=str)
    X = embedder.encode(texts)
    model = HybridHead(mode=mode, head=HEAD, tfidf=TFIDF, hybrid=HybridConfig(stack_folds=3)).fit(X, y, texts=texts)
    info = encoder_info(embedder, str(tiny_encoder_dir))
    conf, right = metrics.confidence_and_correct(y, model.predict_proba(X, texts=texts), model.classes_)
    selective = {"oof_scores": {"confidence": conf.tolist(), "correct": right.tolist()}, "target_accuracy": 0.9}
    labels = make_labels().rename(columns={"code": "label"})[["label", "name"]].assign(description="")
    path = save_bundle(
        tmp_path / "bundle",
        model=model,
        system=mode,
        encoder=info,
        config=config,
        labels=labels,
        metrics={"selective": selective},
    )
    return path, model, X, texts


@pytest.mark.parametrize("mode", ["fusion", "stack"])
def test_hybrid_bundle_classifies_like_the_fitted_head(tiny_encoder_dir, tmp_path, mode):
    path, model, X, texts = _bundle_setup(tiny_encoder_dir, tmp_path, mode)
    bundle = load_bundle(path, device="cpu")
    assert bundle.meta.head.kind == "hybrid"
    np.testing.assert_allclose(bundle.predict_proba(texts), model.predict_proba(X, texts=texts), atol=1e-5)
    assert not any(p.suffix in {".pkl", ".pickle", ".joblib"} for p in path.rglob("*"))


def test_target_accuracy_takes_the_threshold_from_the_bundle(tiny_encoder_dir, tmp_path):
    path, _model, _X, texts = _bundle_setup(tiny_encoder_dir, tmp_path, "fusion")
    bundle = load_bundle(path, device="cpu")
    scores = bundle.meta.metrics["selective"]["oof_scores"]
    threshold = bundle.threshold_for(0.9)
    assert threshold == metrics.threshold_from_scores(scores["confidence"], scores["correct"], 0.9)
    preds = bundle.predict(texts, config=ClassifyConfig(target_accuracy=0.9))
    assert all(p.uncertain == (p.confidence < threshold) for p in preds)
    runner = CliRunner()
    ok = runner.invoke(app, ["classify", texts[0], "--bundle", str(path), "--target-accuracy", "0.9", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output.strip().splitlines()[-1])["uncertain"] == (preds[0].confidence < threshold)
    # a bundle without out-of-fold answers: one line, with the fix
    bare = save_bundle(
        tmp_path / "bare", model=bundle.head, system="fusion", encoder=info_of(bundle), config=bundle_config(bundle),
        labels=bundle.labels, metrics={},
    )  # fmt: skip
    bad = runner.invoke(app, ["classify", texts[0], "--bundle", str(bare), "--target-accuracy", "0.9"])
    assert bad.exit_code == 1 and "no out-of-fold answers" in bad.output and "Traceback" not in bad.output


def test_unreachable_target_accuracy_is_one_clear_error(tiny_encoder_dir, tmp_path):
    path, *_ = _bundle_setup(tiny_encoder_dir, tmp_path, "fusion")
    bundle = load_bundle(path, device="cpu")
    scores = bundle.meta.metrics["selective"]["oof_scores"]
    scores["correct"] = [i % 2 == 0 for i in range(len(scores["correct"]))]  # half right at every confidence
    scores["confidence"] = [0.5] * len(scores["confidence"])
    with pytest.raises(JobembedError, match="no confidence threshold reached it"):
        bundle.threshold_for(0.9)


# --------------------------------------------------------------------------------------- chunking


def test_chunked_encoding_covers_the_whole_text_and_caches_each_window(tiny_encoder_dir):
    config = EmbedConfig(model=str(tiny_encoder_dir), max_seq_length=16, chunking="mean", chunk_stride=8)
    emb = Embedder(config, prompt=None)
    long = " ".join(f"słowo{i}" for i in range(40))
    short = "kierowca"
    windows = emb.chunks(long)
    assert len(windows) > 2 and emb.chunks(short) == [short]
    assert all(w in long for w in windows) and windows[0].startswith("słowo0") and long.endswith(windows[-1])
    tok = emb.model.tokenizer
    assert all(len(tok(w)["input_ids"]) <= 16 for w in windows)
    vectors = emb.encode([long, short])
    plain = Embedder(config.model_copy(update={"chunking": "none"}), prompt=None)
    expected = plain.encode(windows).mean(axis=0)
    np.testing.assert_allclose(vectors[0], expected / np.linalg.norm(expected), atol=1e-5)
    np.testing.assert_allclose(vectors[1], plain.encode([short])[0], atol=1e-6)  # fits: same as truncation
    emb.encode([long, short])
    assert emb.last_stats.n_encoded == 0  # every window came from the cache


def test_chunked_vectors_are_not_mistaken_for_truncated_ones(tmp_path, tiny_encoder_dir):
    """The run's vectors record the chunking; asking for the other setting re-embeds."""
    ads = make_ads(20, seed=2)
    make_labels().to_csv(tmp_path / "labels.csv", index=False)
    ads.to_csv(tmp_path / "ads.csv", index=False)
    cfg = {
        "name": "chunk",
        "runs_dir": str(tmp_path / "runs"),
        "text_column": "text",
        "prepare": {"input": str(tmp_path / "ads.csv"), "text_col": "text", "label_col": "label", "id_col": "id"},
        "embed": {"model": str(tiny_encoder_dir), "max_seq_length": 16},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    run = tmp_path / "runs" / "chunk"
    args = ["embed", str(run), "--config", str(tmp_path / "c.yaml"), "--quiet"]
    first = runner.invoke(app, [*args, "--chunking", "mean", "--chunk-stride", "8"])
    assert first.exit_code == 0, first.output
    (folder,) = [p for p in (run / "embed").iterdir() if p.is_dir()]
    meta = json.loads((folder / "embeddings.json").read_text())
    assert meta["chunking"] == {"pooling": "mean", "stride": 8, "max_chunks": 8}
    chunked = np.load(folder / "train.npy")
    second = runner.invoke(app, [*args, "--chunking", "none"])
    assert second.exit_code == 0, second.output
    assert json.loads((folder / "embeddings.json").read_text())["chunking"] is None
    assert not np.allclose(np.load(folder / "train.npy"), chunked)  # long ads differ: re-embedded, not reused


def test_parent_loss_without_a_hierarchy_is_the_flat_head():
    X, y, _ = _data()
    flat = MLPHead.from_config(HEAD).fit(X, y)
    no_parents = MLPHead.from_config(HEAD.model_copy(update={"parent_weight": 1.0})).fit(X, y, parents=None)
    assert no_parents.parents_ == {}
    np.testing.assert_allclose(no_parents.predict_proba(X), flat.predict_proba(X), atol=1e-6)
