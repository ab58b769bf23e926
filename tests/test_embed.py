import numpy as np
import pytest

from jobembed.config import EmbedConfig
from jobembed.embed import Embedder, VectorCache, cache_namespace


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


@pytest.mark.parametrize("change", [{"prompt": "query: "}, {"max_seq_length": 16}])
def test_setting_changes_give_a_new_cache_namespace(tiny_encoder_dir, tmp_path, change):
    base = Embedder(_cfg(tiny_encoder_dir, tmp_path))
    base.encode(TEXTS)
    cfg = _cfg(tiny_encoder_dir, tmp_path, **{k: v for k, v in change.items() if k != "prompt"})
    other = Embedder(cfg, prompt=change.get("prompt"))
    assert other.cache.folder != base.cache.folder
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


def test_cache_ignores_truncated_shard(tmp_path):
    cache = VectorCache(tmp_path / "ns")
    cache.put([b"k" * 20], np.ones((1, 3), dtype=np.float32))
    (tmp_path / "ns" / "shard-broken.safetensors").write_bytes(b"\x00\x01garbage")
    again = VectorCache(tmp_path / "ns")
    assert len(again) == 1
    np.testing.assert_array_equal(again.get([b"k" * 20]), np.ones((1, 3)))


def test_namespace_is_sensitive_to_every_part():
    base = dict(fingerprint="f", prompt=None, max_seq_length=256, precision="fp32")
    names = {cache_namespace(**base)}
    for key, value in [("fingerprint", "g"), ("prompt", "query: "), ("max_seq_length", 128), ("precision", "fp16")]:
        names.add(cache_namespace(**(base | {key: value})))
    assert len(names) == 5


def test_empty_input_gives_empty_matrix(tiny_encoder_dir, tmp_path):
    out = Embedder(_cfg(tiny_encoder_dir, tmp_path)).encode([])
    assert out.shape == (0, 32)
