import json
import shutil

import numpy as np
import pandas as pd
import pytest

from jobembed.baselines import CentroidClassifier
from jobembed.bundle import find_latest_bundle, load_bundle, save_bundle
from jobembed.config import ClassifyConfig, PipelineConfig
from jobembed.embed import Embedder
from jobembed.errors import BundleError
from jobembed.head import MLPHead
from tests.synthetic import make_ads

LABELS = pd.DataFrame({"label": ["a", "b"], "name": ["Alpha", "Beta"], "description": ["", ""]})


@pytest.fixture
def setup(tiny_encoder_dir, tmp_path):
    config = PipelineConfig.model_validate({"embed": {"model": str(tiny_encoder_dir), "max_seq_length": 64}})
    ads = make_ads(10, seed=5)
    ads = ads[ads["label"].isin(["83", "22"])]
    y = np.where(ads["label"] == "83", "a", "b")
    X = Embedder(config.embed, prompt=None).encode(ads["text"].tolist())
    return config, ads, X, y


@pytest.mark.parametrize("kind", ["mlp", "centroid"])
def test_bundle_roundtrip_predicts_like_the_head(setup, tmp_path, kind):
    config, ads, X, y = setup
    model = MLPHead(hidden_sizes=(8,), max_epochs=5).fit(X, y) if kind == "mlp" else CentroidClassifier().fit(X, y)
    path = save_bundle(
        tmp_path / "b", model=model, system=kind, encoder=config.embed.model, config=config, labels=LABELS
    )
    bundle = load_bundle(path)
    np.testing.assert_allclose(bundle.predict_proba(ads["text"].tolist()), model.predict_proba(X), rtol=1e-5, atol=1e-6)
    preds = bundle.predict(ads["text"].tolist()[:3], config=ClassifyConfig(top_k=2))
    assert all(p.label in {"a", "b"} and len(p.top_k) == 2 for p in preds)
    assert preds[0].name == {"a": "Alpha", "b": "Beta"}[preds[0].label]
    meta = json.loads((path / "bundle.json").read_text())
    assert meta["format"] == "jobembed-bundle/1" and "head/head.safetensors" in meta["files"]


def test_copy_encoder_makes_the_bundle_self_contained(setup, tmp_path, tiny_encoder_dir):
    config, _ads, X, y = setup
    model = CentroidClassifier().fit(X, y)
    path = save_bundle(
        tmp_path / "b",
        model=model,
        system="centroid",
        encoder=config.embed.model,
        config=config,
        labels=LABELS,
        copy_encoder=True,
    )
    moved = tmp_path / "moved"
    shutil.move(str(path), moved)  # the bundle travels without the original encoder path being needed
    bundle = load_bundle(moved)
    assert bundle.encoder_ref.startswith(str(moved))
    assert bundle.predict(["Kierowca kat. C"])[0].label in {"a", "b"}


def test_tampered_file_and_wrong_encoder_are_refused(setup, tmp_path, tiny_encoder_dir):
    from tests.conftest import build_tiny_encoder

    config, _ads, X, y = setup
    path = save_bundle(
        tmp_path / "b",
        model=CentroidClassifier().fit(X, y),
        system="centroid",
        encoder=config.embed.model,
        config=config,
        labels=LABELS,
    )
    labels_file = path / "labels.json"
    labels_file.write_text(labels_file.read_text().replace("Alpha", "Gamma"))
    with pytest.raises(BundleError, match=r"labels\.json"):
        load_bundle(path)
    # same file names, other weights: the fingerprint check catches it before any prediction
    path = save_bundle(
        tmp_path / "c",
        model=CentroidClassifier().fit(X, y),
        system="centroid",
        encoder=config.embed.model,
        config=config,
        labels=LABELS,
    )
    meta = json.loads((path / "bundle.json").read_text())
    other = build_tiny_encoder(tmp_path / "other", seed=1)
    meta["encoder"]["ref"] = str(other)
    (path / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="not the one the head was trained on"):
        load_bundle(path, verify=False).predict(["x"])


def test_min_confidence_and_latest(setup, tmp_path):
    config, _ads, X, y = setup
    runs = tmp_path / "runs"
    save_bundle(
        runs / "old" / "bundle",
        model=CentroidClassifier().fit(X, y),
        system="centroid",
        encoder=config.embed.model,
        config=config,
        labels=LABELS,
    )
    newest = save_bundle(
        runs / "new" / "bundle",
        model=CentroidClassifier().fit(X, y),
        system="centroid",
        encoder=config.embed.model,
        config=config,
        labels=LABELS,
    )
    assert find_latest_bundle(runs) == newest
    pred = load_bundle(newest).predict(["Kierowca"], config=ClassifyConfig(min_confidence=1.0))[0]
    assert pred.label == "uncertain" and pred.top_k[0]["label"] in {"a", "b"}
