"""Shared fixtures: a tiny offline SentenceTransformer and a sandboxed cache.

No test may touch the network or the user's ``~/.cache``: the hub is switched to offline mode at import
time (before transformers/huggingface_hub read the variables) and ``JOBEMBED_CACHE`` points at a
per-session temporary folder.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# ~30 short job-ad sentences, Polish and English, six occupations.
TINY_CORPUS: list[str] = [
    "Kierowca kat. C, praca w Warszawie, umowa o pracę",
    "Zatrudnimy kierowcę ciężarówki w transporcie międzynarodowym",
    "Kierowca dostawczy, prawo jazdy kat. B",
    "Truck driver wanted for long-haul routes",
    "Delivery driver, full-time, own van not required",
    "Pielęgniarka na oddział internistyczny, praca zmianowa",
    "Szpital zatrudni pielęgniarkę z prawem wykonywania zawodu",
    "Registered nurse for night shifts in a care home",
    "Nurse needed in the hospital emergency department",
    "Programista Python, praca zdalna, pełny etat",
    "Programista Java z doświadczeniem w Spring Boot",
    "Junior programmer to build web applications",
    "Software developer, programmer, C# and .NET",
    "Magazynier z uprawnieniami na wózek widłowy",
    "Pracownik magazynu, kompletacja zamówień, praca na zmiany",
    "Warehouse worker, picking and packing, forklift licence a plus",
    "Warehouse operative for a logistics centre near Poznań",
    "Księgowa w biurze rachunkowym, pełna księgowość",
    "Samodzielna księgowa, rozliczenia VAT i CIT",
    "Accountant for month-end closing and payroll",
    "Junior accountant, invoices and bank reconciliations",
    "Kucharz w restauracji, kuchnia polska",
    "Pomoc kuchenna i kucharz na sezon nad morzem",
    "Cook wanted for a busy hotel kitchen",
    "Line cook, breakfast and lunch service",
    "Oferujemy stabilne zatrudnienie i premie",
    "Wymagamy sumienności i komunikatywności",
    "We offer a competitive salary and training",
    "Praca od poniedziałku do piątku w Krakowie",
    "Apply now with your CV and references",
]

TINY_SEED = 0


def build_tiny_encoder(path: Path, *, seed: int = TINY_SEED) -> Path:
    """Build a tiny SentenceTransformer folder (WordPiece tokenizer + random 2-layer BERT + mean pooling).

    Args:
        path: Target folder for the SentenceTransformer; a sibling ``<name>_hf`` holds the raw HF model.
        seed: ``torch.manual_seed`` for the random weights; different seeds give different models.

    Returns:
        ``path``, ready for ``SentenceTransformer(str(path))``.
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import BertConfig, BertModel, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # The vocabulary is built, not trained: the WordPiece trainer breaks ties in hash order, so every session
    # (and CI) got another vocabulary and tests that count subwords saw other token lengths.
    words = sorted(
        {w for line in TINY_CORPUS for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line))}
    )
    chars = sorted({c for w in words for c in w})
    vocab = [*specials, *chars, *(f"##{c}" for c in chars), *(w for w in words if len(w) > 1)]
    tok = Tokenizer(WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    hf_tok = BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    hf_dir = path.parent / f"{path.name}_hf"
    hf_tok.save_pretrained(hf_dir)

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(hf_dir)

    transformer = Transformer(str(hf_dir), max_seq_length=128)
    pooling = Pooling(transformer.get_embedding_dimension(), "mean")
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(path))
    return path


def encoder_info(embedder, model: str):
    """The ``EncoderInfo`` a bundle stores for vectors made by ``embedder`` (an ``embed.Embedder``) of ``model``."""
    from jobembed.bundle import EncoderInfo

    e = embedder
    return EncoderInfo(model, e.fingerprint, e.precision, e.prompt, e.config.max_seq_length)


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SentenceTransformer folder (32-dim, 2 layers, max 128 tokens), built once per session."""
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny_encoder") / "tiny-st")


@pytest.fixture
def tiny_encoder(tiny_encoder_dir: Path):
    """A freshly loaded ``SentenceTransformer`` from ``tiny_encoder_dir`` (CPU)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(tiny_encoder_dir), device="cpu")


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jobembed_cache")


@pytest.fixture(autouse=True)
def _sandbox_env(monkeypatch: pytest.MonkeyPatch, _session_cache: Path) -> None:
    """Every test: offline hub, and ``JOBEMBED_CACHE`` in a session temp folder (never ``~/.cache``)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("JOBEMBED_CACHE", str(_session_cache))


# The builtin e5 folder (~470 MB) is built once into a persistent cache, not per session: $JOBEMBED_TEST_E5_CACHE
# if set, else the user's cache as it is before the autouse fixture below redirects JOBEMBED_CACHE.
def _real_cache() -> Path:
    from jobembed.config import default_cache_dir

    return Path(os.environ.get("JOBEMBED_TEST_E5_CACHE") or default_cache_dir())


REAL_CACHE = _real_cache()
# Session- and module-scoped fixtures (a run built once per module) are set up before the autouse fixture below
# redirects the cache, so the redirect is also made here, once, for the whole process: no test writes ~/.cache.
os.environ["JOBEMBED_CACHE"] = tempfile.mkdtemp(prefix="jobembed-test-cache-")


@pytest.fixture(scope="session")
def real_cache() -> Path:
    """Persistent cache folder for tests that need the builtin e5-small (``slow`` tests)."""
    return REAL_CACHE
