"""Every built-in stage's config section, and the choices they offer, below the modules that do the work.

A worker takes its own section (``embed.embed_splits(config=EmbedConfig)``); a stage module (``jobembed.stages``)
registers it with ``jobembed.config.register_section``, which assembles ``PipelineConfig`` from them. Unknown keys
are errors, so a typo in a YAML file fails loudly; choices are ``StrEnum``s, so ``--help`` lists their values and YAML
keeps plain strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from jobembed.config import Strict as _Strict


class RarePolicy(StrEnum):
    error = "error"
    drop = "drop"
    merge = "merge"


class ConflictPolicy(StrEnum):
    majority = "majority"
    drop = "drop"


class ClassWeight(StrEnum):
    none = "none"
    balanced = "balanced"
    sqrt = "sqrt"


class Precision(StrEnum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class LabelText(StrEnum):
    name = "name"
    description = "description"
    name_description = "name_description"
    # the label's own texts from prepare.taxonomy (its label_kinds), in the ads' language; name_description where
    # the taxonomy has none for a label
    taxonomy = "taxonomy"
    # the mean of the embeddings of every taxonomy text rolled up into the label (prepare.taxonomy.prototype_kinds):
    # a prototype from many short texts (occupation names, job titles) instead of one description
    taxonomy_mean = "taxonomy_mean"


class EmbedBackend(StrEnum):
    torch = "torch"
    # the encoder exported to ONNX and quantised to int8 (jobembed.onnx_backend): faster on a CPU, vectors within
    # ~0.99 cosine of torch's
    onnx_int8 = "onnx-int8"


class ChunkingMode(StrEnum):
    none = "none"
    mean = "mean"


class SystemName(StrEnum):
    zeroshot = "zeroshot"
    centroid = "centroid"
    tfidf = "tfidf"
    logreg = "logreg"
    mlp = "mlp"
    fusion = "fusion"
    stack = "stack"
    hier = "hier"
    topdown = "topdown"
    # the fine-tune's own linear layer (finetune.loss classifier): the plain end-to-end classifier; only on an encoder
    # fine-tuned with that loss
    e2e = "e2e"


class LabelSetConfig(_Strict):
    """A CSV that lists the allowed labels, with optional names and descriptions for zero-shot."""

    path: Path
    code_col: str = "code"
    name_col: str | None = "name"
    description_col: str | None = None
    # e.g. {"level": "isco_submajor"}: one file may hold several label levels (pl-jobads labels.csv does).
    filter: dict[str, str] = Field(default_factory=dict)


class TaxonomyRollUp(StrEnum):
    prefix = "prefix"
    map = "map"


class TaxonomyConfig(_Strict):
    """The label taxonomy's texts (``jobembed.taxonomy``): a table of code, text, kind; never ads."""

    # Their content hashes are in prepare's key instead (as the input's).
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"path", "map"})

    path: Path
    code_col: str = "code"
    text_col: str = "text"
    kind_col: str = "kind"
    # prefix: a text goes to the longest label code its code starts with (ISCO-style codes nest by digits);
    # map: ``map`` is a CSV of code,label for taxonomies whose codes do not nest.
    roll_up: TaxonomyRollUp = TaxonomyRollUp.prefix
    map: Path | None = None
    # The kinds of a label's own texts that make its text for ``embed.label_text: taxonomy``, in this order; empty:
    # every kind, in table order.
    label_kinds: list[str] = Field(default_factory=list)
    # The kinds whose texts, at the label's level and every level below it, are averaged into its prototype for
    # ``embed.label_text: taxonomy_mean``; empty: every kind. On pl-jobads the names (KZiS names at every level,
    # occupation names, ESCO names) doubled zero-shot macro-F1 (experiments/taxonomy_labels.py).
    prototype_kinds: list[str] = Field(default_factory=list)


class PrepareConfig(_Strict):
    """``prepare``: read, validate, dedupe, split."""

    # The input file's content hash is in prepare's key, so moving or renaming the file re-runs nothing.
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"input"})
    LATER_FIELDS: ClassVar[Mapping[str, Any]] = MappingProxyType({"taxonomy": None})

    input: Path | None = None
    text_col: str = "text"
    label_col: str = "label"
    id_col: str | None = None
    labels: LabelSetConfig | None = None
    # 2, not 1: a class needs at least one ad on each side of a split to be learnable and testable.
    min_class_count: int = Field(2, ge=1)
    rare_policy: RarePolicy = RarePolicy.merge
    other_label: str = "other"
    # Reposts with conflicting labels (real: 34 in pl-jobads) keep the majority label; ties keep the first.
    conflict_policy: ConflictPolicy = ConflictPolicy.majority
    # Cosine of TF-IDF word 1-2-gram vectors above which two ads count as the same repost (edited copies).
    near_duplicate_threshold: float = Field(0.9, gt=0, le=1)
    test_size: float = Field(0.2, gt=0, lt=1)
    val_size: float = Field(0.1, ge=0, lt=1)
    seed: int = 13
    # Stratified subsample before splitting; for demos and quick looks. None keeps everything.
    max_rows: int | None = Field(None, ge=10)
    # The label taxonomy's own texts (prepare/taxonomy.parquet); None: no taxonomy.
    taxonomy: TaxonomyConfig | None = None

    @model_validator(mode="after")
    def _shares_leave_training_data(self) -> PrepareConfig:
        if self.test_size + self.val_size >= 0.95:
            raise ValueError(
                f"test_size {self.test_size} + val_size {self.val_size} leave no training share "
                "(they must add up to less than 0.95)"
            )
        return self


class CleanBackend(StrEnum):
    gliner2 = "gliner2"
    rules = "rules"
    none = "none"


class CleanLanguage(StrEnum):
    da = "da"
    pl = "pl"
    en = "en"


class CleanFallback(StrEnum):
    rules = "rules"
    raw = "raw"
    empty = "empty"


class EntityType(_Strict):
    """One GLiNER2 entity type: its name (also its placeholder in the template) and the description the
    model reads with it."""

    name: str = Field(min_length=1, pattern=r"^\w+$")
    description: str = ""
    # None uses clean.threshold.
    threshold: float | None = Field(None, gt=0, lt=1)


class CleanConfig(_Strict):
    """``clean``: rewrite each ad as occupation, skills and tasks (gliner2), or strip its noise (rules).

    ``entities`` and ``template`` default to the language's preset in jobembed/clean/presets.yaml.
    """

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"batch_size", "device", "cache_dir"})

    backend: CleanBackend = CleanBackend.rules
    language: CleanLanguage = CleanLanguage.da
    # A Hub id (pinned to a commit like encoders), or a local GLiNER2 folder (`jobembed clean train` writes one).
    model: str = "fastino/gliner2-multi-v1"
    entities: list[EntityType] | None = None
    # One line per entity type, e.g. "Kompetencer: {kompetence}."; a line whose type found nothing is left out.
    template: list[str] | None = None
    # None: the threshold `clean train` chose on its held-out documents (jobembed-extractor.json), else 0.5.
    threshold: float | None = Field(None, gt=0, lt=1)
    # Enough for a long ad's skills; beyond it the lowest-scoring spans of a type are dropped (prompt budget).
    max_spans_per_type: int = Field(12, ge=1)
    # Windows in the extractor encoder's own subword tokens (not words), so no window passes its position
    # limit; the overlap keeps a span cut by one window's edge whole in the next.
    window_tokens: int = Field(256, ge=32)
    window_overlap: int = Field(48, ge=0)
    # When extraction finds nothing: the rules-cleaned text (default), the raw ad (may carry personal data:
    # warned), or an empty string.
    fallback: CleanFallback = CleanFallback.rules
    batch_size: int = Field(16, ge=1)
    device: str = "auto"
    precision: Precision = Precision.auto
    cache_dir: Path | None = None

    @model_validator(mode="after")
    def _consistent(self) -> CleanConfig:
        if self.window_overlap >= self.window_tokens // 2:
            raise ValueError(
                f"window_overlap {self.window_overlap} must be less than half of window_tokens {self.window_tokens}"
            )
        if self.entities is not None:
            names = [e.name for e in self.entities]
            if len(set(names)) != len(names) or not names:
                raise ValueError(f"entities must be a non-empty list of distinct names, found {names}")
        return self


class EmbedConfig(_Strict):
    """``embed``: encoders, prompts and batching."""

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"batch_size", "device", "checkpoint_every", "cache_dir"})

    model: str = "sentence-transformers/paraphrase-multilingual-mpnet-base-v2"
    # More encoders to embed and compare on the same splits (e.g. a fine-tuned folder); head uses `model`.
    extra_models: list[str] = Field(default_factory=list)
    # "auto" takes the model family's prefix from jobembed/presets/prompts.yaml (e5: "query: ").
    text_prompt: str | None = "auto"
    label_prompt: str | None = "auto"
    # What is embedded for each category (the zero-shot baseline's prototypes).
    label_text: LabelText = LabelText.name_description
    # 256 covers the head of most ads (the median Polish ad is ~310 XLM-R tokens) at a quarter of the
    # attention cost of 512; see docs/truncation.md for what the cut costs in accuracy.
    max_seq_length: int = Field(256, ge=8, le=8192)
    batch_size: int = Field(32, ge=1)
    device: str = "auto"
    # fp16 only applies on CUDA; CPUs stay at fp32 where half precision is slower.
    precision: Precision = Precision.auto
    # Vectors are written to the cache every this many texts, so an interrupted run loses at most this much.
    checkpoint_every: int = Field(2048, ge=1)
    cache_dir: Path | None = None
    # The whole ad instead of its first max_seq_length tokens: "mean" cuts a longer ad into windows of
    # max_seq_length tokens (chunk_stride apart, at most max_chunks), encodes each (cached per window) and
    # averages them. "none" truncates. docs/results.md#quality has what each costs and gains.
    chunking: ChunkingMode = ChunkingMode.none
    # Tokens between window starts; below max_seq_length the windows overlap, so no sentence is only ever cut.
    chunk_stride: int = Field(192, ge=8)
    # Bounds the cost of a very long ad (8 windows of 256 tokens cover ~1,600 tokens, p99 of Polish ads).
    max_chunks: int = Field(8, ge=1)
    # How the encoder runs: torch, or its int8 ONNX export (a CPU user's pipeline time is mostly encoding). Explicit,
    # never "auto": it changes every vector, so it is in the key, and a bundle encodes new ads the same way. int8 is
    # the CPU configs' default (configs/demo.yaml: 1.83x the encode speed, CV macro-F1 within 0.003); this field's
    # stays torch so runs made before it keep their vectors, triplets and fine-tunes, and every encoder and GPU works.
    backend: EmbedBackend = EmbedBackend.torch

    # Added after runs were made: out of the key while at the value those runs had, so their vectors stay current.
    LATER_FIELDS: ClassVar[Mapping[str, Any]] = MappingProxyType({"backend": "torch"})

    def models(self) -> list[str]:
        """``model`` then ``extra_models``, without repeats."""
        return list(dict.fromkeys([self.model, *self.extra_models]))


class HeadConfig(_Strict):
    """``head``: the MLP on embeddings (scikit-learn style, PyTorch inside)."""

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"device"})

    hidden_sizes: list[int] = Field(default_factory=lambda: [512])
    # dropout 0.5 and lr 3e-4 beat 0.2 and 1e-3 in 5-fold CV on the dev pool of pl-jobads sub-major groups with
    # e5-small (docs/results.md, experiments/head_ablation.py): the head overfits ~6k ads within ~10 epochs.
    dropout: float = Field(0.5, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    learning_rate: float = Field(3e-4, gt=0)
    batch_size: int = Field(64, ge=1)
    max_epochs: int = Field(200, ge=1)
    # Epochs without a better validation macro-F1 before stopping.
    patience: int = Field(20, ge=1)
    # sqrt sits between none (majority classes win) and balanced (rare classes with 1-5 ads overfit).
    class_weight: ClassWeight = ClassWeight.sqrt
    calibrate: bool = True
    # z-score the embedding coordinates on the training rows before the first layer: +0.04 CV macro-F1 on the
    # pl-jobads dev pool (experiments/head_ablation.py, docs/results.md).
    standardize: bool = True
    # Share of the training ads held out (stratified, reposts kept together) for early stopping when no
    # validation split is given, as inside cross-validation.
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    # A second loss on the parent level (sub-major summed into major); 0 = flat. The `hier` system of
    # report sets it from report.hierarchy_weight.
    parent_weight: float = Field(0.0, ge=0)
    device: str = "auto"
    seed: int = 13


class TfidfConfig(_Strict):
    """The classical bar: word + char n-gram TF-IDF into logistic regression."""

    word_ngrams: tuple[int, int] = (1, 2)
    char_ngrams: tuple[int, int] = (2, 5)
    # Per vectorizer. In 5-fold CV on the pl-jobads dev pool 200k + 200k features were no better than 50k + 50k
    # (macro-F1 0.564 vs 0.577, p = 0.49) and 1.6x slower: lbfgs time grows with features x classes
    # (experiments/head_ablation.py --tfidf, docs/results.md).
    max_features: int = Field(50_000, ge=100)
    C: float = Field(10.0, gt=0)
    max_iter: int = Field(1000, ge=1)
    # lbfgs stops at 1e-3 in ~35 iterations (68 s -> 26 s per fit on 5.5k ads); the CV figures in docs/results.md
    # that keep TF-IDF + LR as the bar are measured at this tolerance.
    tol: float = Field(1e-3, gt=0)


class HybridConfig(_Strict):
    """The lexical + semantic systems of report (``fusion``, ``stack``)."""

    # Late fusion: log p = w log p_tfidf + (1 - w) log p_mlp, each temperature-calibrated; w is the grid point
    # with the lowest validation log-loss (a proper score: smoother than macro-F1 on ~800 validation ads).
    fusion_weights: list[float] = Field(default_factory=lambda: [round(0.05 * i, 2) for i in range(21)], min_length=1)
    # Stacking: out-of-fold TF-IDF + LR log-probabilities join the embedding as MLP inputs; this many inner
    # folds (each one TF-IDF fit) make them, so no training row's feature comes from a model that saw its label.
    stack_folds: int = Field(5, ge=2)
    # Prior correction of fusion (logit adjustment, Menon et al. 2021): its probabilities divided by the training
    # ads' class shares to this power, renormalised. 0 leaves them as fitted; towards 1 the rare classes get
    # answers the frequent ones lost, buying macro-F1 with a little accuracy. 0.4 was chosen in every fold of the
    # quality CV's out-of-fold answers (experiments/prior_power.py: fine-tuned fusion 0.706 -> 0.721 CV macro-F1,
    # accuracy -0.004); default.yaml sets it. Not applied by stack or by top-down's inner fusions.
    prior_power: float = Field(0.0, ge=0, le=1)

    LATER_FIELDS: ClassVar[Mapping[str, Any]] = MappingProxyType({"prior_power": 0.0})

    @field_validator("fusion_weights")
    @classmethod
    def _in_unit(cls, v: list[float]) -> list[float]:
        if not all(0 <= w <= 1 for w in v):
            raise ValueError("fusion weights must lie in [0, 1]")
        return sorted(set(v))


class TopDownBase(StrEnum):
    mlp = "mlp"
    fusion = "fusion"


class TaxonomyRowsConfig(_Strict):
    """The taxonomy's texts (prepare.taxonomy) as extra training rows of the systems that train; never held out."""

    # Empty: every kind. The names (kzis_name, occupation, esco_name) are short and many; descriptions and tasks
    # are long and one per group.
    kinds: list[str] = Field(default_factory=list)
    # A taxonomy row's weight relative to one ad. Chosen on pl-jobads by CV macro-F1 of fusion over 0.1, 0.3, 1, 3
    # and 10 (experiments/levers.py; docs/results.md, "The taxonomy's texts as training rows"): 3 was best (0.679
    # against 0.614 without rows); at 10 accuracy fell (the taxonomy redrew the frequent classes). The rows lift the
    # rare classes most.
    weight: float = Field(3.0, gt=0, le=10)


class HierarchyMode(StrEnum):
    auto = "auto"  # labels that are digit codes nest by prefix (ISCO: sub-major 24 is inside major 2)
    off = "off"


# fusion is a default: in 5-fold CV on the pl-jobads dev pool it beat TF-IDF + LR (+0.029 macro-F1, corrected
# t-test p = 0.03) and the MLP head (+0.035, p = 0.05); stack and hier did not (experiments/quality.py,
# docs/results.md#quality-hybrid-heads-the-hierarchy-abstention), so they are options.
DEFAULT_SYSTEMS = ("zeroshot", "centroid", "tfidf", "logreg", "mlp", "fusion")


class ReportConfig(_Strict):
    """``report``: which systems, how to evaluate. Encoders come from ``embed.model`` + ``extra_models``."""

    systems: list[SystemName] = Field(default_factory=lambda: [SystemName(s) for s in DEFAULT_SYSTEMS], min_length=1)
    cv_folds: int = Field(5, ge=2)
    # Macro-F1 over classes with at least this many test ads (rare classes swing macro-F1 on 1-2 ads).
    min_support: int = Field(5, ge=1)
    bootstrap: int = Field(1000, ge=0)
    tfidf: TfidfConfig = Field(default_factory=TfidfConfig)
    hybrid: HybridConfig = Field(default_factory=HybridConfig)
    # Where labels nest (ISCO codes), every system is also scored at the parent level; `hier` trains on both.
    hierarchy: HierarchyMode = HierarchyMode.auto
    # The `hier` system's weight of the parent-level loss.
    hierarchy_weight: float = Field(0.5, ge=0)
    # The `topdown` system's models at both levels: fusion (TF-IDF + MLP, the best flat system) or the MLP alone.
    topdown_base: TopDownBase = TopDownBase.fusion
    # The taxonomy's own texts as extra training rows (weighted; every fit's training side only). None: ads only.
    taxonomy_rows: TaxonomyRowsConfig | None = None
    # Per-class F1 over the pooled out-of-fold answers is reported for classes with at most this many dev ads.
    rare_class_max_ads: int = Field(30, ge=1)
    # Selective classification: the confidence threshold at which the out-of-fold answers of the CV reach this
    # accuracy is reported with the coverage and accuracy it gives on test; the bundle keeps those answers, so
    # classify --target-accuracy computes thresholds by the same rule (validation confidences are optimistic: the
    # validation split stopped and calibrated the heads).
    target_accuracy: float = Field(0.9, gt=0, le=1)
    # Fine-tune inside every CV fold (the finetune-cv stage: mine, judge, fine-tune and encode on the fold's training
    # rows only), so the fine-tuned systems join the CV table, its tests and the ranking. Off by default: it costs
    # one fine-tune per fold (on 2 CPU cores ~35 minutes a fold on pl-jobads' 6,248 dev ads; minutes on a GPU).
    finetune_cv: bool = False
    # Keep each fold's fine-tuned model after its vectors are written (~470 MB each for a base-size encoder).
    keep_fold_models: bool = False
    # Fine-tune at most this many folds in one command, then stop with one line (finished folds are kept): a CPU
    # run split over several sittings. None: all of them.
    max_new_folds: int | None = Field(None, ge=1)

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"keep_fold_models", "max_new_folds"})
    # Added after runs were made: out of the key while at the values those runs had, so their reports stay current.
    LATER_FIELDS: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {"finetune_cv": False, "topdown_base": "fusion", "taxonomy_rows": None, "rare_class_max_ads": 30}
    )

    @field_validator("systems")
    @classmethod
    def _unique(cls, v: list[SystemName]) -> list[SystemName]:
        return list(dict.fromkeys(v))


class BundleEncoderChoice(StrEnum):
    frozen = "frozen"
    finetuned = "finetuned"


class BundleConfig(_Strict):
    """``bundle``: what goes into the deployable bundle besides the head."""

    # frozen: the system that won report's CV. finetuned: the same kind of system on the run's fine-tuned
    # encoder (never ranked by CV, which would be leaky; compare it on the report's test-split section first).
    encoder: BundleEncoderChoice = BundleEncoderChoice.frozen

    # Copy a local/builtin encoder folder into the bundle so it runs where the cache is absent
    # (a server); off by default because e5-small alone is ~470 MB.
    copy_encoder: bool = False
    # Put the report's page (report/index.html: figures and tables, no ad text) into the bundle as report.html, for
    # `jobembed serve` to show at /report (serve.report). Off by default: a bundle carries what serving needs.
    report_page: bool = False
    # onnx-int8: also store the encoder as its int8 ONNX export with its tokenizer (encoder-onnx/), so a server
    # without PyTorch can run it (jobembed-serve --backend onnx-int8; dockerfiles/serve.Dockerfile).
    backend: EmbedBackend = EmbedBackend.torch

    # Added after runs were made: out of the key while at the values those runs had, so their bundles stay current.
    LATER_FIELDS: ClassVar[Mapping[str, Any]] = MappingProxyType({"report_page": False, "backend": "torch"})


class ClassifyConfig(_Strict):
    """``classify`` defaults; a bundle carries the section of the run that made it, flags override it."""

    top_k: int = Field(3, ge=1)
    # Below this top probability the answer is `uncertain_label`; 0 always answers.
    min_confidence: float = Field(0.0, ge=0, le=1)
    # Instead of min_confidence: the threshold at which the bundled system's out-of-fold answers (stored in the
    # bundle by report) reached this accuracy; None uses min_confidence.
    target_accuracy: float | None = Field(None, gt=0, le=1)
    uncertain_label: str = "uncertain"


class TrackingBackend(StrEnum):
    none = "none"
    mlflow = "mlflow"
    wandb = "wandb"
    tensorboard = "tensorboard"


class TrackingConfig(_Strict):
    """``tracking``: where each stage that runs is logged (``jobembed.tracking``). Changes no output: never in a key."""

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"backend", "uri", "experiment", "log_dir"})

    backend: TrackingBackend = TrackingBackend.none
    # MLflow's tracking URI. None: $MLFLOW_TRACKING_URI, else sqlite:///<runs_dir>/mlflow.db (a file beside the runs,
    # readable with `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`).
    uri: str | None = None
    # The MLflow experiment, or the W&B project.
    experiment: str = "jobembed"
    # TensorBoard's event folder (default RUN/tensorboard), or where W&B keeps its local files (default RUN).
    log_dir: Path | None = None


class ServeBackend(StrEnum):
    torch = "torch"
    onnx_int8 = "onnx-int8"


class ServeConfig(_Strict):
    """``serve``: the HTTP API in front of a bundle (``jobembed serve``)."""

    # Loopback by default: put a reverse proxy (TLS, rate limits) in front, or pass --host 0.0.0.0 on purpose.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Each worker holds its own copy of the encoder and uses all cores for one batch at a time, so on CPU one
    # worker is the right start; more workers keep serving when one dies and help on many-core machines.
    workers: int = Field(1, ge=1)
    # torch, or the encoder exported to ONNX and quantised to int8 (the CPU lever; vectors within about 0.99
    # cosine of torch's, measured by experiments/bench_serve.py as macro-F1 on the test split). None: the backend the
    # bundle's training vectors were made with (embed.backend), so serving encodes as training did.
    backend: ServeBackend | None = None
    device: str = "auto"
    # Micro-batching: requests that arrive while the encoder is busy, or within batch_wait_ms of each other
    # under load, share one encode call. A lone request on an idle server never waits.
    batching: bool = True
    # None: 5 ms on an accelerator (a fuller batch costs little more than one text there) and 0 on CPU, where
    # texts are encoded one by one anyway (encode_batch_size) and a wait would only add latency; requests that
    # queue while the encoder is busy are still batched.
    batch_wait_ms: float | None = Field(None, ge=0, le=1000)
    max_batch_texts: int = Field(64, ge=1)
    # Texts per forward pass inside one encode call. None: 1 on CPU, where padding a batch to its longest ad costs
    # more than batching saves (e5-small, 2 threads, real ads: 12.9 texts/s at batch 1, 10.7 at batch 32), and the
    # bundle's embed.batch_size (32) on an accelerator, where the batch is the speed.
    encode_batch_size: int | None = Field(None, ge=1)
    # Answer repeated texts (a re-posted ad, a page reloaded) from a bounded in-memory cache of vectors; the server
    # never writes the on-disk store, so a stream of new texts grows no file. Off for benchmarks.
    cache: bool = True
    # Texts whose vectors the cache keeps (least recently used go first): e5-small's 384 floats are 1.5 kB, so
    # 10,000 texts are ~15 MB per worker.
    cache_size: int = Field(10_000, ge=1)
    # Limits. pl-jobads' longest ad has 21,560 characters (median 1,267), and the encoder reads at most
    # max_seq_length tokens (x max_chunks with chunking) of it anyway; 50,000 leaves room for any real ad.
    # The body limit is what max_texts texts of typical length (a few kB each, JSON-escaped) need, many times over.
    max_texts: int = Field(128, ge=1)
    max_chars: int = Field(50_000, ge=1)
    max_body_bytes: int = Field(8_000_000, ge=1024)
    request_timeout_s: float = Field(60.0, gt=0)
    # Browser origins allowed to call the API (CORS); empty: same-origin only (the page at / needs none).
    cors_origins: list[str] = Field(default_factory=list)
    # Show the bundle's report page (bundle.report_page) at /report, behind the API key like every other route. The
    # page holds figures, tables, category names and ad ids, never an ad's text.
    report: bool = False

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {
            "host",
            "port",
            "workers",
            "backend",
            "device",
            "batching",
            "batch_wait_ms",
            "max_batch_texts",
            "encode_batch_size",
            "cache",
            "cache_size",
            "report",
        }
    )


class JudgeKind(StrEnum):
    llm = "llm"
    model = "model"
    none = "none"


class JudgeMode(StrEnum):
    pointwise = "pointwise"
    listwise = "listwise"


class PositiveStrategy(StrEnum):
    nearest = "nearest"
    random = "random"
    farthest = "farthest"
    label = "label"


class NoiseFilter(StrEnum):
    """cleanlab's ``find_label_issues(filter_by=...)`` methods, strictest last."""

    prune_by_noise_rate = "prune_by_noise_rate"
    prune_by_class = "prune_by_class"
    both = "both"
    confident_learning = "confident_learning"


class LLMConfig(_Strict):
    """The ``llm`` judge of triplets: any OpenAI-compatible chat-completions endpoint.

    The API key is read from ``OPENAI_API_KEY`` only; it has no field here, so it can never reach a config,
    manifest or bundle.
    """

    # How fast, not what: out of the stage key (the call cache is keyed by model, prompt and schema anyway).
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {
            "base_url",
            "concurrency",
            "requests_per_minute",
            "tokens_per_minute",
            "timeout",
            "max_retries",
            "backoff_base",
            "max_cost",
            "price_input_per_1m",
            "price_output_per_1m",
            "allow_raw_text",
        }
    )

    # None: api.openai.com. vLLM: http://HOST:8000/v1; Ollama: http://localhost:11434/v1.
    base_url: str | None = None
    model: str = "gpt-4o-mini"
    mode: JudgeMode = JudgeMode.listwise
    # 0: the same prompt gets the same verdict, so a cached answer is the answer a re-run would get.
    temperature: float = Field(0.0, ge=0, le=2)
    # A verdict is a short JSON object; a listwise one names up to ~10 candidate numbers and a one-line reason.
    max_tokens: int = Field(300, ge=16)
    # Each ad is cut to this many characters in the prompt: the clean stage's text is ~300-600 characters, a raw
    # Polish ad ~1,500; the head of an ad names the job.
    max_ad_chars: int = Field(1200, ge=100)
    # Calls in flight. 32 keeps a 200 ms-latency endpoint ~30x faster than one at a time (docs/benchmarks.md)
    # and stays below the per-key concurrency most hosted endpoints accept.
    concurrency: int = Field(32, ge=1)
    # OpenAI tier-1 limits for gpt-4o-mini are 500 RPM / 200k TPM; raise them to your account's tier.
    requests_per_minute: int | None = Field(500, ge=1)
    tokens_per_minute: int | None = Field(200_000, ge=100)
    timeout: float = Field(60.0, gt=0)
    # Retries on 429, 5xx, timeouts and dropped connections, with exponential backoff, jitter and Retry-After.
    max_retries: int = Field(6, ge=0)
    # Seconds before the first retry; doubled each time, with jitter; Retry-After wins when longer.
    backoff_base: float = Field(0.5, ge=0)
    # A reply that is not the schema's JSON is asked again this many times, then counted and skipped.
    parse_retries: int = Field(1, ge=0)
    # USD per 1M tokens (gpt-4o-mini list prices, 2024-07); the Batch API halves both.
    price_input_per_1m: float = Field(0.15, ge=0)
    price_output_per_1m: float = Field(0.60, ge=0)
    # Stop cleanly (answered calls stay cached; re-run to resume) before the estimated spend passes this (USD).
    max_cost: float | None = Field(None, gt=0)
    # Raw ads carry names, phone numbers and e-mail addresses: sending them to an endpoint off this machine
    # needs this switch (the judge reads the clean stage's text whenever a clean stage ran).
    allow_raw_text: bool = False


class TripletsConfig(_Strict):
    """``triplets``: mine anchor/positive/negative candidates and judge them (llm, model or none)."""

    # model by default: offline and free; `--judge llm` spends money only when asked for.
    judge: JudgeKind = JudgeKind.model
    positive: PositiveStrategy = PositiveStrategy.nearest
    # Cap and floor of anchors per class, so 950-ad classes do not drown 5-ad ones. A class with fewer ads than
    # the floor reuses its ads as anchors, each time with its next positive where it has another.
    max_anchors_per_class: int = Field(64, ge=1)
    min_anchors_per_class: int = Field(8, ge=1)
    negatives_per_anchor: int = Field(3, ge=1)
    # Negatives come from the classes the frozen encoder confuses most with the anchor's (nearest-centroid
    # confusions on the pool, ties by centroid similarity); 0 takes every other class.
    confused_classes: int = Field(5, ge=0)
    # NV-Retriever's positive-aware mining (TopK-PercPos): a negative must score below 95% of the similarity of
    # the anchor's nearest same-class ad (whatever positive is trained on); closer ones are too often unlabelled
    # positives.
    relative_margin: float = Field(0.95, gt=0, le=1)
    # The validation triplets (mined within the val split only) for finetune's evaluators.
    val_anchors_per_class: int = Field(16, ge=0)
    # The model judge: out-of-fold probabilities of logistic regression on the frozen embeddings, averaged
    # with TF-IDF + LR's when true (two views of the text catch more label errors than one).
    model_tfidf: bool = True
    # How cleanlab decides an ad is mislabelled. "both" found flipped training labels of pl-jobads with the best F1
    # (0.469 mean over uniform and confusable flips, vs 0.463 prune_by_noise_rate) and flags the fewest unflipped
    # ads (649 of 5,470 vs 882): experiments/judge_noise.py on the training split only, docs/results.md.
    noise_filter: NoiseFilter = NoiseFilter.both
    cv_folds: int = Field(5, ge=2)
    seed: int = 13
    llm: LLMConfig = Field(default_factory=LLMConfig)
    # A second round: the model judge reads these out-of-fold probabilities (one file of a first round's
    # report/oof/, e.g. the fine-tuned fusion's) instead of fitting its own on the frozen vectors. Its content, not
    # its path, is in the key. Every train and val ad must be in it: the same prepare settings and data.
    judge_probs: Path | None = None

    # where judge_probs lies changes nothing (its content hash is in the stage's identity)
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"judge_probs"})

    @model_validator(mode="after")
    def _probs_for_the_model_judge(self) -> TripletsConfig:
        if self.judge_probs is not None and self.judge != JudgeKind.model:
            raise ValueError(f"triplets.judge_probs is read by the model judge only, and the judge is {self.judge}")
        return self

    @model_validator(mode="after")
    def _floor_below_cap(self) -> TripletsConfig:
        if self.min_anchors_per_class > self.max_anchors_per_class:
            raise ValueError(
                f"min_anchors_per_class {self.min_anchors_per_class} is above "
                f"max_anchors_per_class {self.max_anchors_per_class}"
            )
        return self


class FinetuneLoss(StrEnum):
    # on triplets (the triplets stage's, or finetune.triplets)
    mnrl = "mnrl"
    cached_mnrl = "cached_mnrl"
    gist = "gist"
    triplet = "triplet"
    # on every training ad with its label (no triplets): the plain end-to-end classifier (a linear layer on the
    # sentence embedding, cross-entropy with class weights) and sentence-transformers' label-based triplet losses
    classifier = "classifier"
    batch_hard = "batch_hard"
    batch_all = "batch_all"

    @property
    def on_labels(self) -> bool:
        """Whether the loss trains on labelled ads instead of triplets."""
        return self in (FinetuneLoss.classifier, FinetuneLoss.batch_hard, FinetuneLoss.batch_all)


# the losses with a margin hinge on distances (finetune.triplet_margin)
MARGIN_LOSSES = (FinetuneLoss.batch_hard, FinetuneLoss.batch_all, FinetuneLoss.triplet)


class FinetuneConfig(_Strict):
    """``finetune``: the encoder on triplets' kept triplets with ``SentenceTransformerTrainer``."""

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {
            "device",
            "gradient_checkpointing",
            "mini_batch_size",
            "dataloader_workers",
            "cache_dir",
            "keep_checkpoints",
            "pretokenize",
            "compile",
        }
    )
    # Added after runs were made: out of the key while at the values those runs had (they act on the classifier loss
    # only; runs before them trained it this way).
    LATER_FIELDS: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {"class_weight": "sqrt", "head_learning_rate": 2e-3, "triplet_margin": None}
    )

    # Off by default: a fine-tune costs minutes on a GPU and ~15 or more on a laptop CPU. `jobembed finetune RUN`
    # turns it on for that run; with it on, report adds the fine-tuned encoder's systems.
    enabled: bool = False
    # None: embed.model, the frozen encoder the triplets were mined with.
    model: str | None = None
    # None: the run's triplets/train.parquet; or any Parquet with anchor, positive, negative columns.
    triplets: Path | None = None
    loss: FinetuneLoss = FinetuneLoss.mnrl
    # mnrl only: same-class candidates are not in-batch negatives (with 39 classes and batches of 64 many would
    # be), using the anchor and negative classes the training dataset's label column carries.
    class_aware: bool = True
    # e.g. [384, 256, 128]: MatryoshkaLoss around the loss, so truncated vectors stay useful.
    matryoshka_dims: list[int] = Field(default_factory=list)
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(32, ge=2)
    learning_rate: float = Field(3e-5, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_seq_length: int = Field(128, ge=8, le=8192)
    # Cap on training triplets (the demo's short CPU fine-tune); None trains on all. With a loss on labels, the cap
    # on training ads (a stratified sample).
    max_triplets: int | None = Field(None, ge=2)
    # loss classifier: the class weights of its cross-entropy (as the MLP head's: sqrt between none and balanced) and
    # the learning rate of its linear layer, which starts from nothing while the encoder starts trained.
    class_weight: ClassWeight = ClassWeight.sqrt
    head_learning_rate: float = Field(2e-3, gt=0)
    # loss batch_hard, batch_all or triplet: the hinge's margin on the Euclidean distance; None keeps
    # sentence-transformers' 5. The encoders here end in a Normalize module (distances at most 2), so a margin of 5
    # never closes: every triplet pushes forever, an unbounded ranking loss (issue 21's batch_hard screen sat at
    # loss 5.0). Below 2 (0.5-1 is usual for unit vectors) a triplet already apart by the margin stops pushing; at 0.5
    # that screen trained the same model as at 5 (no hardest triplet got that far apart), so it is not a default.
    triplet_margin: float | None = Field(None, gt=0)
    # Evaluations (TripletEvaluator on the val triplets, centroid-cosine macro-F1 of the val ads) per epoch; the
    # checkpoint that classifies val best is kept.
    evals_per_epoch: int = Field(2, ge=1)
    # Training ads (stratified) whose class centroids the val ads are scored against in each evaluation.
    eval_train_ads: int = Field(2000, ge=10)
    precision: Precision = Precision.auto
    gradient_checkpointing: bool = False
    mini_batch_size: int = Field(32, ge=1)
    dataloader_workers: int = Field(0, ge=0)
    # Speed levers (experiments/bench_finetune.py measures each against the plain trainer). pretokenize: every
    # distinct text tokenised once up front, not in every step's collator (same batches, so not part of the stage's
    # identity; the anchor of a triplet recurs for each of its negatives).
    pretokenize: bool = True
    # Batches of similar-length triplets: less padding, but it changes which ads are each other's in-batch
    # negatives, so it is off unless asked for.
    group_by_length: bool = False
    # torch.compile through the trainer: pays a compile at start; worth it for long GPU runs only.
    compile: bool = False
    device: str = "auto"
    keep_checkpoints: bool = False
    # The bundled model's training seed (the finetune stage).
    seed: int = 13
    # The test-split protocol over fine-tuning seeds (e.g. [13, 14, 15]): one draw is not evidence, a fine-tune's
    # own noise is ~0.01 macro-F1 here. Every seed besides ``seed`` is one more fine-tune on the same triplets (the
    # finetune-seeds stage), its every split re-encoded; report shows each seed, the spread, and McNemar per seed.
    # The finetune stage does not read it, so adding a seed never re-runs the bundled model's fine-tune.
    seeds: list[int] = Field(default_factory=list)
    cache_dir: Path | None = None

    @model_validator(mode="after")
    def _margin_needs_a_margin_loss(self) -> FinetuneConfig:
        if self.triplet_margin is not None and self.loss not in MARGIN_LOSSES:
            raise ValueError(
                f"triplet_margin {self.triplet_margin} acts on the losses {', '.join(MARGIN_LOSSES)}, not on "
                f"{self.loss}: drop it, or pick one of those losses"
            )
        return self
