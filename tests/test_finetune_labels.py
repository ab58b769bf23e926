"""Fine-tuning objectives that use every training ad (issue 21, lever 2): the plain end-to-end classifier and the
label-based triplet losses, on their own and inside the CV, with the classifier's own layer as the ``e2e`` system."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from jobembed.artifacts import read_json
from jobembed.cli import app
from jobembed.errors import DataError
from jobembed.finetune import CLASSIFIER_FILE, labelled_rows, read_classifier
from jobembed.head import MLPHead
from tests.synthetic import tiny_finetune_run

runner = CliRunner()
FINETUNE = {"epochs": 1, "batch_size": 8, "max_seq_length": 32, "evals_per_epoch": 2, "keep_checkpoints": True}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})


def test_labelled_rows_keep_every_class_when_capped_and_leave_out_empty_ads():
    texts = [f"ad {i}" for i in range(40)]
    labels = ["a"] * 30 + ["b"] * 8 + ["c"] * 2
    rows = labelled_rows(texts, labels, classes=["a", "b", "c"], ids=[str(i) for i in range(40)], what="x", limit=10)
    assert set(rows.frame["label"]) == {0, 1, 2} and len(rows.frame) <= 12  # stratified: the rare class stays
    assert rows.source["rows"] == len(rows.frame) and len(rows.source["ads_seen"]) == len(rows.frame)
    rows = labelled_rows(["a", "b", "c", " "], list("abab"), classes=["a", "b"], ids=list("0123"), what="x")
    assert rows.source["empty_left_out"] == 1 and "3" not in rows.source["ads_seen"]  # nothing to learn from
    with pytest.raises(DataError, match="too few to fine-tune on"):
        labelled_rows(["a", "b"], ["a", "a"], classes=["a"], ids=["0", "1"], what="x")


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, tiny_encoder_dir) -> Path:
    """A tiny run fine-tuned as a classifier, with the recipe inside a 2-fold CV and e2e among the systems."""
    root = tmp_path_factory.mktemp("finetune-labels")
    cfg = tiny_finetune_run(root, name="clf", model=tiny_encoder_dir, finetune=FINETUNE | {"loss": "classifier"})
    cfg["head"] = {"hidden_sizes": [16], "max_epochs": 10, "patience": 3}
    cfg["report"] = {"cv_folds": 2, "bootstrap": 0, "systems": ["centroid", "mlp", "tfidf", "e2e"]}
    cfg["report"]["tfidf"] = {"max_features": 500}
    (root / "clf.yaml").write_text(yaml.safe_dump(cfg))
    run = root / "runs" / "clf"
    assert invoke("prepare", run, "-c", root / "clf.yaml", "-q").exit_code == 0
    result = invoke("report", run, "--finetune-cv", "-q")
    assert result.exit_code == 0, result.output
    return run


def test_a_classifier_fine_tune_trains_on_the_labelled_ads_without_triplets(classifier_run: Path):
    info = read_json(classifier_run / "finetune" / "finetune.json")
    train = pd.read_parquet(classifier_run / "prepare" / "train.parquet")
    empty = info["triplets"]["empty_left_out"]
    assert info["data"] == "labels" and info["classifier"] and info["triplets"]["rows"] == len(train) - empty
    assert not (classifier_run / "triplets").exists()  # no triplets were mined or judged
    assert set(read_json(classifier_run / "finetune" / "ads_seen.json")) <= set(train["id"].astype(str))
    weight, bias, classes = read_classifier(classifier_run / "finetune" / "model")
    assert weight.shape == (len(classes), 32) and bias.shape == (len(classes),)
    card = (classifier_run / "finetune" / "model" / "README.md").read_text()
    assert "labelled ads" in card and CLASSIFIER_FILE in card


def test_the_classifier_layer_travels_with_its_checkpoint(classifier_run: Path):
    """The trainer saves and reloads only the encoder: the layer kept with the model is the one of the checkpoint
    whose encoder was kept (the best on validation), not the last step's."""
    from safetensors.numpy import load_file

    info = read_json(classifier_run / "finetune" / "finetune.json")
    folder = classifier_run / "finetune" / "checkpoints"
    saved = sorted(folder.rglob(CLASSIFIER_FILE))
    assert saved, "every checkpoint keeps the layer"
    state = json.loads((saved[-1].parent / "trainer_state.json").read_text())
    best = Path(state["best_model_checkpoint"]).name
    (best_file,) = [p for p in saved if p.parent.name == best]
    raw = load_file(str(best_file))
    weight, bias, _ = read_classifier(classifier_run / "finetune" / "model")
    np.testing.assert_allclose(bias, raw["bias"], atol=1e-6)
    np.testing.assert_allclose(weight, raw["weight"] * np.sqrt(weight.shape[1]), rtol=1e-5, atol=1e-6)
    assert info["steps"] > 0


def test_e2e_is_a_cv_system_of_the_fine_tuned_encoder_only(classifier_run: Path):
    m = read_json(classifier_run / "report" / "metrics.json")
    e2e = {k: r for k, r in m["systems"].items() if r["system"] == "e2e"}
    assert len(e2e) == 1  # not on the frozen encoder: it has no layer of its own
    (r,) = e2e.values()
    assert r["finetuned_cv"] and len(r["cv"]["folds"]) == 2 and set(r["versus"]) == {"tfidf"}
    for k in (1, 2):  # each fold keeps its own layer after its model is dropped
        unit = classifier_run / "finetune-cv" / "units" / f"fold-{k}"
        assert read_classifier(unit) is not None and not (unit / "finetune" / "model").exists()
        assert read_json(unit / "fold.json")["triplets"]["judge"] == "none (labels)"


def test_an_e2e_winner_is_bundled_as_a_linear_head(classifier_run: Path, tmp_path):
    cfg = tmp_path / "e2e.yaml"
    cfg.write_text("report:\n  systems: [e2e]\n")
    result = invoke("bundle", classifier_run, "-c", cfg, "-q")
    assert result.exit_code == 0, result.output
    meta = read_json(classifier_run / "bundle" / "bundle.json")
    assert meta["system"] == "e2e" and meta["head"]["kind"] == "mlp"
    head = MLPHead.load(classifier_run / "bundle" / meta["head"]["path"], device="cpu")
    assert head.hidden_sizes == () and not head.standardize
    ok = invoke("classify", "kierowca kat. C transport", "--bundle", classifier_run / "bundle", "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output.strip().splitlines()[-1])["label"] in set(head.classes_)


@pytest.mark.parametrize("loss", ["batch_hard", "batch_all"])
def test_label_based_triplet_losses_fine_tune_on_the_ads(tmp_path, tiny_encoder_dir, loss):
    cfg = tiny_finetune_run(tmp_path, name=loss, model=tiny_encoder_dir, finetune=FINETUNE | {"loss": loss})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "runs" / loss
    assert invoke("prepare", run, "-c", tmp_path / "run.yaml", "-q").exit_code == 0
    result = invoke("finetune", run, "-q")
    assert result.exit_code == 0, result.output
    info = read_json(run / "finetune" / "finetune.json")
    assert info["data"] == "labels" and info["loss"] == loss and not info["classifier"] and info["steps"] > 0
    assert "labelled ads" in result.output
    assert read_classifier(run / "finetune" / "model") is None


@pytest.mark.parametrize(
    ("loss", "margin", "attribute", "expected"),
    [
        ("batch_hard", None, "triplet_margin", 5),  # sentence-transformers' own default, unchanged
        ("batch_hard", 0.5, "triplet_margin", 0.5),
        ("batch_all", 0.8, "triplet_margin", 0.8),
        ("triplet", 0.3, "triplet_margin", 0.3),
    ],
)
def test_the_triplet_margin_reaches_the_loss(tiny_encoder_dir, loss, margin, attribute, expected):
    from sentence_transformers import SentenceTransformer

    from jobembed.finetune import build_loss
    from jobembed.sections import FinetuneConfig

    config = FinetuneConfig(loss=loss, triplet_margin=margin)
    built = build_loss(SentenceTransformer(str(tiny_encoder_dir), device="cpu"), config=config, n_classes=3)
    assert getattr(built, attribute) == expected


def test_a_label_loss_with_a_triplet_file_is_one_clear_error(tmp_path, tiny_encoder_dir):
    cfg = tiny_finetune_run(tmp_path, name="bad", model=tiny_encoder_dir, finetune=FINETUNE | {"loss": "classifier"})
    pd.DataFrame({"anchor": ["a", "b"], "positive": ["a", "b"], "negative": ["b", "a"]}).to_parquet(tmp_path / "t.pq")
    cfg["finetune"]["triplets"] = str(tmp_path / "t.pq")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "runs" / "bad"
    result = invoke("prepare", run, "-c", tmp_path / "run.yaml", "-q")  # refused before anything runs
    assert result.exit_code == 1 and "trains on the run's labelled ads" in result.output and not run.exists()
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_the_classifier_layer_reads_unit_length_vectors_as_embed_writes_them():
    """Reproduces: the layer was trained on the raw sentence embedding but applied to the unit-length vectors embed
    writes; for an encoder without a Normalize module the served answers were not the trained ones."""
    import torch

    from jobembed.finetune import classifier_loss

    class Raw(torch.nn.Module):  # an encoder whose embeddings are not unit length
        def get_embedding_dimension(self) -> int:
            return 4

        def forward(self, features):
            return {"sentence_embedding": features["x"]}

    loss = classifier_loss(Raw(), n_classes=3, class_weights=np.ones(3))
    x = torch.tensor([[3.0, 0.0, 4.0, 0.0], [0.0, 10.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2])
    weight, bias = loss.linear()
    unit = x.numpy() / np.linalg.norm(x.numpy(), axis=1, keepdims=True)
    logits = torch.tensor(unit @ weight.T + bias)
    expected = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.isclose(loss([{"x": x}], labels), expected, atol=1e-5)


def test_e2e_is_calibrated_only_on_rows_its_fine_tune_did_not_train_on():
    """Reproduces: with an empty val split, the held-out protocol cut a 'CV inner slice' of train, rows the finetune
    stage had trained on: an overconfident temperature. Now: CV folds (val_idx None) calibrate on the inner slice,
    a held-out fit without val keeps temperature 1."""
    import pandas as pd

    from jobembed.config import PipelineConfig
    from jobembed.embed import RunVectors
    from jobembed.evaluate import EvalSettings, System, _fit_predict

    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b"], 40)
    X = (rng.normal(size=(80, 4)) + np.where(y == "a", 1.0, -1.0)[:, None]).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    dev = pd.DataFrame({"id": [str(i) for i in range(80)], "label": y, "group": np.arange(80), "text": ["t"] * 80})
    vectors = RunVectors("m", "f" * 16, "fp32", None, X, X[:0], X[:4], np.zeros((2, 4), np.float32))
    vectors.classifier = (np.array([[5.0, 0, 0, 0], [-5.0, 0, 0, 0]]), np.zeros(2), ["a", "b"])
    settings = EvalSettings.of(PipelineConfig.model_validate({"text_column": "text"}))
    common = {"settings": settings, "labels": None, "dev": dev, "X_dev": X, "train_idx": np.arange(80),
              "X_eval": X[:4], "texts_eval": ["t"] * 4}  # fmt: skip
    _, held_out = _fit_predict(System("e2e", vectors, "m"), val_idx=np.arange(0), **common)
    _, in_cv = _fit_predict(System("e2e", vectors, "m"), val_idx=None, **common)
    assert held_out.temperature_ == 1.0 and in_cv.temperature_ != 1.0


def test_a_checkpoint_without_its_classifier_layer_is_not_resumed_from(tmp_path):
    """Reproduces: a run killed between the trainer's files and the layer's left a checkpoint that looked complete;
    resuming from it restarted the layer from nothing."""
    from jobembed.finetune import last_complete_checkpoint

    for step, layer in ((10, True), (20, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text("{}")
        if layer:
            (folder / CLASSIFIER_FILE).write_bytes(b"x")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-20")
    assert last_complete_checkpoint(tmp_path, require=CLASSIFIER_FILE) == str(tmp_path / "checkpoint-10")


def test_the_classifier_loss_refuses_several_processes(tmp_path, tiny_encoder_dir, monkeypatch):
    """Its layer lives in the loss, outside what DDP synchronises: refused with one line, not trained apart."""
    from jobembed import distributed
    from jobembed.finetune import finetune
    from jobembed.sections import FinetuneConfig

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    rows = labelled_rows(["a b", "c d", "e f", "g h"], list("xyxy"), classes=["x", "y"], ids=list("0123"), what="t")
    with pytest.raises(DataError, match="one process"):
        finetune(
            triplets=rows, val_triplets=None, centroid_data=None, model_ref=str(tiny_encoder_dir), text_prompt=None,
            config=FinetuneConfig(loss="classifier", device="cpu", max_seq_length=16), out_dir=tmp_path / "out",
        )  # fmt: skip
