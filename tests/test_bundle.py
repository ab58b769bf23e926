import json
import shutil

import numpy as np
import pandas as pd
import pytest

from jobembed.baselines import CentroidClassifier
from jobembed.bundle import EncoderInfo, find_latest_bundle, load_bundle, save_bundle
from jobembed.config import PipelineConfig
from jobembed.embed import Embedder
from jobembed.encoders import model_fingerprint
from jobembed.errors import BundleError
from jobembed.head import MLPHead
from jobembed.sections import ClassifyConfig
from tests.conftest import encoder_info
from tests.synthetic import make_ads

LABELS = pd.DataFrame({"label": ["a", "b"], "name": ["Alpha", "Beta"], "description": ["", ""]})


@pytest.fixture
def setup(tiny_encoder_dir):
    config = PipelineConfig.model_validate(
        {
            "text_column": "text",
            "embed": {"model": str(tiny_encoder_dir), "max_seq_length": 64},
            "classify": {"min_confidence": 0.2},
        }
    )
    ads = make_ads(10, seed=5)
    ads = ads[ads["label"].isin(["83", "22"])]
    y = np.where(ads["label"] == "83", "a", "b")
    embedder = Embedder(config.embed, prompt=None)
    X = embedder.encode(ads["text"].tolist())
    info = encoder_info(embedder, str(tiny_encoder_dir))
    return config, ads, X, y, info


def _save(path, config, info, model, **kw):
    return save_bundle(path, model=model, system="centroid", encoder=info, config=config, labels=LABELS, **kw)


@pytest.mark.parametrize("kind", ["mlp", "centroid"])
def test_bundle_roundtrip_predicts_like_the_head(setup, tmp_path, kind):
    config, ads, X, y, info = setup
    model = MLPHead(hidden_sizes=(8,), max_epochs=5).fit(X, y) if kind == "mlp" else CentroidClassifier().fit(X, y)
    path = _save(tmp_path / "b", config, info, model)
    bundle = load_bundle(path)
    np.testing.assert_allclose(bundle.predict_proba(ads["text"].tolist()), model.predict_proba(X), rtol=1e-5, atol=1e-6)
    preds = bundle.predict(ads["text"].tolist()[:3], config=ClassifyConfig(top_k=2))
    assert all(p.label in {"a", "b"} and len(p.top_k) == 2 for p in preds)
    assert preds[0].name == {"a": "Alpha", "b": "Beta"}[preds[0].label]
    meta = json.loads((path / "bundle.json").read_text())
    assert meta["format"] == "jobembed-bundle/3" and "head/head.safetensors" in meta["files"]
    assert meta["encoder"]["precision"] == "fp32" and meta["encoder"]["fingerprint"] == info.fingerprint


def test_classify_defaults_come_from_the_bundle(setup, tmp_path):
    config, _ads, X, y, info = setup
    bundle = load_bundle(_save(tmp_path / "b", config, info, CentroidClassifier().fit(X, y)))
    assert bundle.classify_defaults.min_confidence == 0.2
    pred = bundle.predict(["Kierowca"], config=bundle.classify_defaults.model_copy(update={"min_confidence": 1.0}))
    assert pred[0].label == "uncertain" and pred[0].uncertain


def test_copy_encoder_makes_the_bundle_self_contained(setup, tmp_path):
    config, _ads, X, y, info = setup
    path = _save(tmp_path / "b", config, info, CentroidClassifier().fit(X, y), copy_encoder=True)
    moved = tmp_path / "moved"
    shutil.move(str(path), moved)  # the bundle travels without the original encoder path being needed
    bundle = load_bundle(moved)
    assert bundle.encoder_ref.startswith(str(moved))
    assert bundle.meta.encoder.copy_fingerprint == info.fingerprint  # a copy has the content's fingerprint
    assert bundle.predict(["Kierowca kat. C"])[0].label in {"a", "b"}


def test_tampered_file_and_wrong_encoder_are_refused(setup, tmp_path):
    from tests.conftest import build_tiny_encoder

    config, _ads, X, y, info = setup
    path = _save(tmp_path / "b", config, info, CentroidClassifier().fit(X, y))
    labels_file = path / "labels.json"
    labels_file.write_text(labels_file.read_text().replace("Alpha", "Gamma"))
    with pytest.raises(BundleError, match=r"labels\.json"):
        load_bundle(path)
    # same file names, other weights: the fingerprint check catches it before any prediction
    path = _save(tmp_path / "c", config, info, CentroidClassifier().fit(X, y))
    meta = json.loads((path / "bundle.json").read_text())
    other = build_tiny_encoder(tmp_path / "other", seed=1)
    meta["encoder"]["ref"] = str(other)
    (path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="not the one the head was trained on"):
        load_bundle(path, verify=False).predict(["x"])


def _edit_meta(path, edit):
    meta_path = path / "bundle.json"
    text = meta_path.read_text()
    if callable(edit):
        meta = json.loads(text)
        edit(meta)
        text = json.dumps(meta)
    else:
        text = edit
    meta_path.write_text(text)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ('{"format": "jobembed-bundle/3", "system": ', "not valid JSON"),
        ("[]", "a JSON object"),
        (lambda m: m.pop("encoder"), "field 'encoder'"),
        (lambda m: m.pop("files"), "field 'files'"),
        (lambda m: m["encoder"].update(max_seq_length="long"), "encoder.max_seq_length"),
        (lambda m: m.update(format="jobembed-bundle/1"), "unsupported bundle format"),
    ],
    ids=["truncated", "list", "no-encoder", "no-files", "wrong-type", "old-format"],
)
def test_corrupt_bundle_json_is_one_clear_error(setup, tmp_path, edit, needle):
    """Reproduces: truncated JSON or [] crashed with a traceback; a removed 'files' key skipped every hash check."""
    config, _ads, X, y, info = setup
    path = _save(tmp_path / "b", config, info, CentroidClassifier().fit(X, y))
    _edit_meta(path, edit)
    with pytest.raises(BundleError, match=needle) as err:
        load_bundle(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["encoder"].update(max_seq_length=8),
        lambda m: m["classify"].update(min_confidence=0.99),
        lambda m: m["metrics"].update(selective={}),
        lambda m: m.update(meta_sha256=""),
    ],
    ids=["max_seq_length", "min_confidence", "abstention-answers", "digest-removed"],
)
def test_an_edited_bundle_json_is_refused_like_an_edited_file(setup, tmp_path, edit):
    """Reproduces (issue 23): bundle.json was outside the hash check; editing encoder.max_seq_length changed the
    answers and classify.min_confidence 0.99 made every answer uncertain, both accepted by classify and serve."""
    config, _ads, X, y, info = setup
    path = _save(tmp_path / "b", config, info, CentroidClassifier().fit(X, y))
    load_bundle(path)  # as made: accepted
    _edit_meta(path, edit)
    with pytest.raises(BundleError, match=r"bundle\.json was edited") as err:
        load_bundle(path)
    assert "\n" not in str(err.value)


def test_an_added_file_is_refused(setup, tmp_path):
    config, _ads, X, y, info = setup
    path = _save(tmp_path / "b", config, info, CentroidClassifier().fit(X, y))
    (path / "head" / "extra.json").write_text("{}")
    with pytest.raises(BundleError, match="not part of the bundle"):
        load_bundle(path)


def test_min_confidence_and_latest(setup, tmp_path):
    config, _ads, X, y, info = setup
    runs = tmp_path / "runs"
    _save(runs / "old" / "bundle", config, info, CentroidClassifier().fit(X, y))
    newest = _save(runs / "new" / "bundle", config, info, CentroidClassifier().fit(X, y))
    assert find_latest_bundle(runs) == newest
    pred = load_bundle(newest).predict(["Kierowca"], config=ClassifyConfig(min_confidence=1.0))[0]
    assert pred.label == "uncertain" and pred.top_k[0]["label"] in {"a", "b"}


@pytest.mark.slow
def test_copied_builtin_e5_bundle_loads_and_predicts(tmp_path, real_cache, monkeypatch):
    """Reproduces: a bundle with copy_encoder from builtin:multilingual-e5-small could never load (it stored the
    builtin's source fingerprint and checked the copied folder's)."""
    monkeypatch.setenv("JOBEMBED_CACHE", str(real_cache))
    ref = "builtin:multilingual-e5-small"
    config = PipelineConfig.model_validate({"embed": {"model": ref, "max_seq_length": 64}})
    embedder = Embedder(config.embed, prompt="query: ")
    texts = ["Kierowca kat. C+E", "Pielęgniarka na oddział"] * 3
    X = embedder.encode(texts)
    info = encoder_info(embedder, ref)
    path = _save(tmp_path / "b", config, info, CentroidClassifier().fit(X, ["a", "b"] * 3), copy_encoder=True)
    shutil.move(str(path), tmp_path / "elsewhere")
    bundle = load_bundle(tmp_path / "elsewhere")
    assert bundle.meta.encoder.fingerprint == model_fingerprint(ref)
    np.testing.assert_allclose(bundle.predict_proba(texts), bundle.head.predict_proba(X), atol=1e-5)


def test_bundle_records_the_pinned_hub_revision(setup, tmp_path):
    """A bundle made from a Hub encoder records the commit its vectors came from, and loads that commit."""
    config, _ads, X, y, _info = setup
    commit = "0123456789abcdef0123456789abcdef01234567"
    ref = f"sentence-transformers/paraphrase-multilingual-mpnet-base-v2@{commit}"  # an explicit commit: no lookup
    info = EncoderInfo(ref, model_fingerprint(ref), "fp16", None, 256)
    path = _save(tmp_path / "b", config, info, CentroidClassifier().fit(X, y))
    meta = json.loads((path / "bundle.json").read_text())["encoder"]
    assert (meta["revision"], meta["source_ref"], meta["ref"], meta["precision"]) == (commit, ref, ref, "fp16")
    assert load_bundle(path).encoder_ref == ref  # what the embedder resolves: that exact commit
