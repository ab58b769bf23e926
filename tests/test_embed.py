import json

import numpy as np
import pytest

from jobembed.data import label_texts
from jobembed.embed import Embedder, cache_namespace, embed_splits, load_vectors, short_name
from jobembed.errors import DataError
from jobembed.sections import EmbedConfig
from jobembed.store import STORE_FILE, Store
from tests.synthetic import make_ads


def _cfg(model_dir, tmp_path, **kw):
    settings = {"max_seq_length": 64} | kw
    return EmbedConfig(
        model=str(model_dir), text_prompt=None, label_prompt=None, cache_dir=tmp_path / "cache", **settings
    )


TEXTS = ["Kierowca kat. C", "Nurse for night shifts", "Programista Python", "Kierowca kat. C", "Księgowa"]


def test_vectors_match_plain_encode_and_are_normalised(tiny_encoder_dir, tiny_encoder, tmp_path):
    emb = Embedder(_cfg(tiny_encoder_dir, tmp_path))
    got = emb.encode(TEXTS)
    tiny_encoder.max_seq_length = 64
    plain = tiny_encoder.encode(TEXTS, normalize_embeddings=True)
    assert got.shape == plain.shape == (5, 32)
    np.testing.assert_allclose(got, plain, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert emb.last_stats.n_unique == 4 and emb.last_stats.n_encoded == 4  # the repeated text is encoded once


def test_warm_cache_never_loads_the_model(tiny_encoder_dir, tmp_path):
    first = Embedder(_cfg(tiny_encoder_dir, tmp_path)).encode(TEXTS)
    warm = Embedder(_cfg(tiny_encoder_dir, tmp_path))
    again = warm.encode(list(reversed(TEXTS)))
    assert warm._model is None
    assert warm.last_stats.n_cached == 4 and warm.last_stats.n_encoded == 0
    np.testing.assert_array_equal(again, first[::-1])


def test_a_memory_cache_is_bounded_writes_nothing_to_disk_and_answers_as_the_store(tiny_encoder_dir, tmp_path):
    stored = Embedder(_cfg(tiny_encoder_dir, tmp_path / "a")).encode(TEXTS)
    emb = Embedder(_cfg(tiny_encoder_dir, tmp_path / "b"), memory_cache=2)
    got = emb.encode(TEXTS)  # 4 unique texts through a cache of 2: hits are read before misses evict them
    np.testing.assert_allclose(got, stored, atol=1e-6)
    assert len(emb.cache) == 2 and not (tmp_path / "b" / "cache" / STORE_FILE).exists()
    emb.encode([TEXTS[-1]])
    assert emb.last_stats.n_cached == 1
    emb.encode([TEXTS[1]])  # misses are encoded (and kept) longest first: the longest text went first
    assert emb.last_stats.n_encoded == 1 and len(emb.cache) == 2


@pytest.mark.parametrize("change", [{"prompt": "query: "}, {"max_seq_length": 16}, {"precision": "bf16"}])
def test_setting_changes_give_a_new_cache_namespace(tiny_encoder_dir, tmp_path, change):
    base = Embedder(_cfg(tiny_encoder_dir, tmp_path))
    base.encode(TEXTS)
    cfg = _cfg(tiny_encoder_dir, tmp_path, **{k: v for k, v in change.items() if k != "prompt"})
    other = Embedder(cfg, prompt=change.get("prompt"))
    assert other.cache.name != base.cache.name
    other.encode(TEXTS)
    assert other.last_stats.n_encoded == 4


def test_interrupted_run_keeps_finished_checkpoints(tiny_encoder_dir, tmp_path, monkeypatch):
    texts = [f"ad number {i} with some words" for i in range(10)]
    emb = Embedder(_cfg(tiny_encoder_dir, tmp_path, checkpoint_every=4))
    real_encode = emb.model.encode
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(emb.model, "encode", flaky)
    with pytest.raises(KeyboardInterrupt):
        emb.encode(texts)
    monkeypatch.undo()
    resumed = Embedder(_cfg(tiny_encoder_dir, tmp_path, checkpoint_every=4))
    resumed.encode(texts)
    assert resumed.last_stats.n_cached == 4 and resumed.last_stats.n_encoded == 6


def test_single_text_calls_grow_no_files(tiny_encoder_dir, tmp_path):
    """Reproduces the shard store's flaw: five one-text calls made five files (and a server would make millions)."""
    for i in range(5):
        Embedder(_cfg(tiny_encoder_dir, tmp_path)).encode([f"one ad at a time, number {i}"])
    files = {p.name for p in (tmp_path / "cache").iterdir() if p.is_file()}
    assert files <= {STORE_FILE, STORE_FILE + "-wal", STORE_FILE + "-shm"}
    assert len(Embedder(_cfg(tiny_encoder_dir, tmp_path)).cache) == 5


def test_read_only_cache_serves_hits_and_still_answers_misses(tiny_encoder_dir, tmp_path, monkeypatch):
    import jobembed.store as store_module

    warm = Embedder(_cfg(tiny_encoder_dir, tmp_path)).encode(TEXTS[:2])
    store_module._STORES.clear()
    # Tests run as root, for whom every folder is writable: fake the permission check instead.
    monkeypatch.setattr(store_module.os, "access", lambda *a, **k: False)
    try:
        emb = Embedder(_cfg(tiny_encoder_dir, tmp_path))
        got = emb.encode(TEXTS)
        assert emb.cache.store.readonly
        np.testing.assert_allclose(got[:2], warm, atol=1e-6)
        assert (emb.last_stats.n_cached, emb.last_stats.n_encoded) == (2, 2)
        again = Embedder(_cfg(tiny_encoder_dir, tmp_path))
        again.encode(TEXTS)
        assert again.last_stats.n_encoded == 2  # nothing was written into the read-only store
    finally:
        store_module._STORES.clear()


def test_namespace_is_sensitive_to_every_part():
    base = dict(fingerprint="f", prompt=None, max_seq_length=256, precision="fp32")
    names = {cache_namespace(**base)}
    for key, value in [("fingerprint", "g"), ("prompt", "query: "), ("max_seq_length", 128), ("precision", "fp16")]:
        names.add(cache_namespace(**(base | {key: value})))
    assert len(names) == 5


def test_empty_input_gives_empty_matrix(tiny_encoder_dir, tmp_path):
    out = Embedder(_cfg(tiny_encoder_dir, tmp_path)).encode([])
    assert out.shape == (0, 32)


@pytest.mark.parametrize(
    ("ref", "short"),
    [
        ("builtin:Multilingual-E5-Small", "multilingual-e5-small"),
        (
            "sentence-transformers/paraphrase-multilingual-mpnet-base-v2@" + "a" * 40,
            "paraphrase-multilingual-mpnet-base-v2",
        ),
        ("runs/ft/encoder/", "encoder"),
    ],
)
def test_short_name(ref, short):
    assert short_name(ref) == short


@pytest.fixture
def embedded_run(tiny_encoder_dir, tmp_path):
    ads = make_ads(6, seed=2)
    ads["group"] = np.arange(len(ads))
    splits = {"train": ads.iloc[:20], "val": ads.iloc[20:26], "test": ads.iloc[26:]}
    labels = ads[["label"]].drop_duplicates().assign(name=lambda f: "n" + f["label"], description="")
    cfg = _cfg(tiny_encoder_dir, tmp_path)
    folders = embed_splits(splits=splits, labels=labels, out_dir=tmp_path / "embed", config=cfg)
    return cfg, splits, labels, folders


def test_embed_stage_writes_what_later_stages_read(embedded_run, tmp_path):
    cfg, splits, labels, folders = embedded_run
    (folder,) = folders.values()
    meta = json.loads((folder / "embeddings.json").read_text())
    assert meta["splits"]["train"]["rows"] == 20 and meta["labels"]["rows"] == len(labels)
    vec = load_vectors(
        tmp_path / "embed", model=cfg.model, config=cfg, splits=splits, labels=labels, text_column="text"
    )
    assert vec.train.shape == (20, 32) and vec.test.shape == (len(splits["test"]), 32)
    direct = Embedder(cfg).encode(splits["val"]["text"].tolist())
    np.testing.assert_allclose(vec.val, direct, atol=1e-6)
    assert vec.labels.shape == (len(label_texts(labels, "name_description")), 32)


@pytest.mark.parametrize("change", ["rows", "max_seq_length", "text_column"])
def test_stale_vectors_are_refused(embedded_run, tmp_path, change):
    cfg, splits, labels, _ = embedded_run
    kwargs = dict(model=cfg.model, config=cfg, splits=splits, labels=labels, text_column="text")
    if change == "rows":
        kwargs["splits"] = {**splits, "train": splits["train"].iloc[1:]}
    elif change == "max_seq_length":
        kwargs["config"] = cfg.model_copy(update={"max_seq_length": 32})
    else:
        kwargs["text_column"] = "clean_text"
    with pytest.raises(DataError, match="re-run `jobembed embed"):
        load_vectors(tmp_path / "embed", **kwargs)


def test_store_is_a_single_sqlite_file(tmp_path):
    store = Store(tmp_path / "c")
    table = store.vectors("ns")
    table.put([b"k" * 20, b"j" * 20], np.eye(2, 3, dtype=np.float32))
    assert store.integrity_check() == "ok"
    np.testing.assert_array_equal(table.get([b"j" * 20]), [[0, 1, 0]])
