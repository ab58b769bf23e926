"""The clean stage: GLiNER2 windows and cache, the rewrite, fallbacks, the stage in the graph, the bundle's
cleaner at predict time, and the `clean run/eval/train` commands. A tiny GLiNER2 is trained once per
session on a tiny BERT (128 positions) with `clean train` itself."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from jobembed.clean.core import Cleaner, clean_splits, resolved_schema, rewrite
from jobembed.clean.gliner import Extractor, ScoredSpan, load_gliner
from jobembed.clean.pii import find_pii
from jobembed.cli import app
from jobembed.config import load_config
from jobembed.errors import ConfigError, JobembedError
from jobembed.sections import CleanConfig
from tests.synthetic import make_ads, make_labels

runner = CliRunner()
ENTITIES = [
    {"name": "occupation", "description": "job title"},
    {"name": "skill", "description": "required skill"},
]
TEMPLATE = ["Occupation: {occupation}.", "Skills: {skill}."]
GOLD_SENTENCES = [
    ("We hire a nurse who knows Python and Excel.", [("nurse", "occupation"), ("Python", "skill"), ("Excel", "skill")]),
    ("Programista Java potrzebny, znajomość SQL.", [("Programista", "occupation"), ("SQL", "skill")]),
    ("Truck driver with forklift licence wanted.", [("Truck driver", "occupation"), ("forklift licence", "skill")]),
    ("Accountant for payroll, VAT and Excel.", [("Accountant", "occupation"), ("Excel", "skill")]),
    ("Cook wanted, knowledge of HACCP required.", [("Cook", "occupation"), ("HACCP", "skill")]),
    ("Magazynier z uprawnieniami, obsługa SAP.", [("Magazynier", "occupation"), ("SAP", "skill")]),
]


def _gold_rows(n_copies: int = 3) -> list[dict]:
    rows = []
    for k in range(n_copies):
        for i, (text, spans) in enumerate(GOLD_SENTENCES):
            out = []
            for surface, label in spans:
                start = text.index(surface)
                out.append({"start": start, "end": start + len(surface), "label": label, "text": surface})
            rows.append({"id": f"g{k}-{i}", "text": text, "spans": out})
    return rows


@pytest.fixture(scope="session")
def gold_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gold") / "gold.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in _gold_rows()) + "\n", encoding="utf-8")
    return path


def _clean_config(model: str | Path, **kw) -> CleanConfig:
    base = {
        "backend": "gliner2",
        "language": "en",
        "model": str(model),
        "entities": ENTITIES,
        "template": TEMPLATE,
        "threshold": 0.3,
        "window_tokens": 48,
        "window_overlap": 8,
        "batch_size": 4,
        "device": "cpu",
    }
    return CleanConfig.model_validate(base | kw)


@pytest.fixture(scope="session")
def tiny_gliner_dir(tmp_path_factory, tiny_encoder_dir, gold_file) -> Path:
    """A tiny GLiNER2 trained for a few epochs by `jobembed clean train` on the tiny BERT (128 positions)."""
    out = tmp_path_factory.mktemp("gliner") / "tiny-gliner"
    result = runner.invoke(
        app,
        [
            "clean", "train", "--gold", str(gold_file), "--out", str(out),
            "--base-model", str(tiny_encoder_dir.parent / f"{tiny_encoder_dir.name}_hf"),
            "--config", str(_write_config(tmp_path_factory.mktemp("cfg"), _clean_config("unused"))),
            "--epochs", "3", "--batch-size", "4", "--device", "cpu", "--quiet",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def _write_config(folder: Path, clean: CleanConfig) -> Path:
    path = folder / "clean.yaml"
    path.write_text(yaml.safe_dump({"clean": clean.model_dump(mode="json")}))
    return path


# ------------------------------------------------------------------------------------- train + load


def test_clean_train_writes_a_versioned_loadable_extractor(tiny_gliner_dir):
    sidecar = json.loads((tiny_gliner_dir / "jobembed-extractor.json").read_text())
    assert sidecar["format"] == "jobembed-extractor/1"
    assert sidecar["split"]["train_docs"] + sidecar["split"]["val_docs"] == len(_gold_rows())
    assert sidecar["gold"]["sha256"] and sidecar["encoder_fingerprint"]
    assert set(sidecar["val_scores"]) >= {"exact", "overlap"}
    assert (tiny_gliner_dir / "model.safetensors").is_file()
    assert not list(tiny_gliner_dir.glob("*.bin")) and not list(tiny_gliner_dir.glob("*.pt"))
    model, resolved = load_gliner(str(tiny_gliner_dir))
    assert resolved.kind == "local" and model.encoder.config.max_position_embeddings == 128
    # the threshold chosen on the held-out documents is what `clean` uses unless one is set
    assert str(sidecar["threshold"]) in sidecar["threshold_sweep"]
    assert Cleaner(_clean_config(tiny_gliner_dir, threshold=None)).threshold == sidecar["threshold"]
    assert Cleaner(_clean_config(tiny_gliner_dir, threshold=0.42)).threshold == 0.42


def test_a_sentence_encoder_is_not_an_extractor(tiny_encoder_dir):
    with pytest.raises(JobembedError, match="not a GLiNER2 model"):
        load_gliner(str(tiny_encoder_dir))


# ------------------------------------------------------------------------------------- windows


def _long_ad(n: int = 120) -> str:
    return " ".join(f"Nurse number {i} knows Python, Excel and SQL at https://example.com/job/{i}." for i in range(n))


def test_plain_gliner2_crashes_on_a_long_ad_and_windows_do_not(tiny_gliner_dir):
    model, _ = load_gliner(str(tiny_gliner_dir))
    ad = _long_ad()
    with pytest.raises(RuntimeError):  # the reported bug: no truncation, 128 positions exceeded
        model.batch_extract_entities([ad], ["occupation", "skill"], threshold=0.3)
    extractor = Extractor(model, entities=ENTITIES, threshold=0.3, window_tokens=200, window_overlap=16)
    windows = extractor.windows(ad)
    assert len(windows) > 5
    cost = extractor._word_cost
    for w in windows:
        words = list(model.processor.word_splitter(w.text, lower=True))
        assert sum(cost(x) for x, _, _ in words) <= extractor.budget
    assert windows[0].start_char == 0 and windows[-1].end_char == len(ad.rstrip())
    # consecutive windows overlap, so a span cut by one edge is whole in the next
    assert all(b.start_char < a.end_char for a, b in itertools.pairwise(windows))
    [spans] = extractor.extract([ad])
    assert all(ad[s.start : s.end] == s.text for s in spans)
    assert max(s.start for s in spans) > len(ad) // 2, "spans past the first window must be found"


@pytest.mark.parametrize("overlap", [4, 16])
def test_windows_overlap_even_where_the_cut_word_costs_more_than_the_overlap(tiny_gliner_dir, overlap):
    # A pasted URL costs ~18 subwords of the tiny tokenizer; shifting the ad word by word puts a window's last
    # word on every kind of word, URLs included, whatever vocabulary the session's tokenizer learnt.
    model, _ = load_gliner(str(tiny_gliner_dir))
    extractor = Extractor(model, entities=ENTITIES, window_tokens=200, window_overlap=overlap)
    for shift in range(12):
        ad = "Nurse " * shift + _long_ad(20)
        windows = extractor.windows(ad)
        assert len(windows) > 2
        assert all(b.start_char < a.end_char for a, b in itertools.pairwise(windows)), f"no overlap at shift {shift}"


def test_only_gliner2_clean_keys_carry_the_windowing_version(tiny_gliner_dir):
    from jobembed.clean.gliner import WINDOWS_VERSION
    from jobembed.stages.clean import _clean_identity

    gliner = load_config(None, {"clean": _clean_config(tiny_gliner_dir).model_dump(mode="json")})
    rules = load_config(None, {"clean.backend": "rules"})
    assert _clean_identity(gliner)["windows_version"] == WINDOWS_VERSION
    assert "windows_version" not in _clean_identity(rules)  # a windowing fix does not re-run rules runs


def test_windows_fit_the_encoder_limit_even_when_asked_for_more(tiny_gliner_dir):
    model, _ = load_gliner(str(tiny_gliner_dir))
    extractor = Extractor(model, entities=ENTITIES, window_tokens=4096, window_overlap=16)
    assert extractor.budget < 128
    assert extractor.extract([_long_ad(40)])  # would raise if a window passed 128 positions


# ------------------------------------------------------------------------------------- rewrite


def test_rewrite_dedupes_caps_orders_and_drops_empty_lines():
    spans = [
        ScoredSpan(30, 36, "skill", "Python", 0.9),
        ScoredSpan(0, 5, "occupation", "Nurse", 0.8),
        ScoredSpan(50, 56, "skill", "python", 0.7),  # case duplicate
        ScoredSpan(60, 65, "skill", "Excel", 0.6),
        ScoredSpan(70, 73, "skill", "SQL", 0.2),  # over the cap of 2 by score
    ]
    out = rewrite(spans, template=[*TEMPLATE, "Tasks: {occupation} {skill}."], max_spans_per_type=2)
    assert out.startswith("Occupation: Nurse. Skills: Python, Excel.")
    assert "SQL" not in out and "python" not in out
    assert rewrite([ScoredSpan(0, 5, "skill", "Excel", 0.9)], template=TEMPLATE, max_spans_per_type=3) == (
        "Skills: Excel."
    )


def test_template_placeholders_are_checked():
    with pytest.raises(ConfigError, match=r"\{task\}"):
        resolved_schema(CleanConfig(entities=ENTITIES, template=["Tasks: {task}."]))
    entities, template = resolved_schema(CleanConfig(language="da"))
    assert [e["name"] for e in entities] == ["stillingsbetegnelse", "kompetence", "arbejdsopgave"]
    assert template[0].startswith("Stilling:")


# ------------------------------------------------------------------------------------- cache + fallback


def test_extractions_are_cached_and_a_schema_change_re_extracts(tiny_gliner_dir):
    texts = [f"Nurse {i} who knows Python and Excel." for i in range(10)] + [_long_ad(10)]
    first = Cleaner(_clean_config(tiny_gliner_dir)).clean(texts)
    assert first.stats["extracted"] == 11
    again = Cleaner(_clean_config(tiny_gliner_dir))
    second = again.clean(texts)
    assert second.stats["extracted"] == 0 and second.stats["cached"] == 11
    assert again._extractor is None, "a warm cache must not load the model"
    assert second.texts == first.texts and second.spans == first.spans
    # template and span cap apply after the cache: no re-extraction
    assert Cleaner(_clean_config(tiny_gliner_dir, max_spans_per_type=1)).clean(texts).stats["extracted"] == 0
    assert Cleaner(_clean_config(tiny_gliner_dir, threshold=0.31)).clean(texts).stats["extracted"] == 11


@pytest.mark.parametrize(
    ("fallback", "source", "expect"),
    [("rules", "rules", lambda raw, out: "@" not in out and "Python" in out), ("empty", "empty", lambda r, o: o == "")],
)
def test_nothing_extracted_falls_back_and_is_counted(tiny_gliner_dir, fallback, source, expect):
    raw = "Nurse who knows Python. Send your CV to jan.kowalski@example.com or call +48 601 234 567."
    cleaner = Cleaner(_clean_config(tiny_gliner_dir, threshold=0.999, fallback=fallback))
    result = cleaner.clean([raw])
    assert result.source == [source]
    assert expect(raw, result.texts[0])


def test_gliner_output_holds_only_spans_and_template_words(tiny_gliner_dir):
    ads = [a + " Kontakt: jan.kowalski@example.com, +48 601 234 567" for a in make_ads(3, seed=1)["text"]]
    result = Cleaner(_clean_config(tiny_gliner_dir, threshold=0.05)).clean(ads)
    assert "gliner2" in result.source
    for out, src, spans in zip(result.texts, result.source, result.spans, strict=True):
        if src != "gliner2":
            continue
        rest = out
        pieces = sorted({" ".join(s.text.split()) for s in spans if s.text.strip()}, key=len, reverse=True)
        for piece in ["Occupation:", "Skills:", *pieces]:
            rest = rest.replace(piece, " ")
        assert re.fullmatch(r"[\s.,]*", rest), f"{out!r} holds words that are neither spans nor template: {rest!r}"
        assert not find_pii(out), "spans holding personal data must be dropped"
    assert result.stats["pii_spans_dropped"] > 0  # this junk-emitting tiny model does extract the e-mail address


# ------------------------------------------------------------------------------------- stage + bundle


@pytest.fixture(scope="module")
def cleaned_run(tmp_path_factory, tiny_encoder_dir):
    root = tmp_path_factory.mktemp("cleanrun")
    ads = make_ads(15, seed=5)
    ads.loc[:5, "text"] = ads.loc[:5, "text"] + " Kontakt: anna.nowak@firma.pl, tel. 601 234 567."
    ads.to_csv(root / "ads.csv", index=False)
    make_labels().to_csv(root / "labels.csv", index=False)
    cfg = {
        "name": "cleaned",
        "runs_dir": str(root / "runs"),
        "text_column": "clean_text",
        "prepare": {"input": str(root / "ads.csv"), "id_col": "id", "test_size": 0.25, "val_size": 0.15},
        "clean": {"backend": "rules", "language": "pl"},
        "embed": {"model": str(tiny_encoder_dir), "max_seq_length": 64},
        "head": {"hidden_sizes": [16], "max_epochs": 10, "patience": 3},
        "report": {"systems": ["centroid", "mlp"], "cv_folds": 2, "bootstrap": 20},
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["run", "--config", str(root / "cfg.yaml"), "--quiet"])
    assert result.exit_code == 0, result.output
    return root / "runs" / "cleaned"


def test_clean_stage_writes_its_own_folder_and_report(cleaned_run):
    prepared = pd.read_parquet(cleaned_run / "prepare" / "train.parquet")
    cleaned = pd.read_parquet(cleaned_run / "clean" / "train.parquet")
    assert list(cleaned.columns) == ["id", "clean_text", "clean_source", "spans"]
    assert (cleaned["id"] == prepared["id"]).all()
    assert "clean_text" not in prepared.columns, "prepare's files are never rewritten"
    report = json.loads((cleaned_run / "clean" / "report.json").read_text())
    assert report["cleaner"]["backend"] == "rules" and report["pii_check"]["rows_with_pii"] == 0
    assert report["mean_chars"]["after"] < report["mean_chars"]["before"]
    assert "Personal-data check" in (cleaned_run / "clean" / "report.md").read_text()
    assert "Cleaning: every system read the clean stage's text" in (cleaned_run / "report" / "report.md").read_text()


def test_bundle_trained_on_clean_text_never_sees_raw_text(cleaned_run, monkeypatch):
    from jobembed.bundle import load_bundle
    from jobembed.embed import Embedder

    bundle = load_bundle(cleaned_run / "bundle")
    assert bundle.meta.text_column == "clean_text" and bundle.meta.cleaner.info["backend"] == "rules"
    seen: list[str] = []
    real = Embedder.encode

    def spy(self, texts, **kw):
        seen.extend(texts)
        return real(self, texts, **kw)

    monkeypatch.setattr(Embedder, "encode", spy)
    raw = "Programista Python. Kontakt: jan.kowalski@example.com, tel. +48 601 234 567, www.firma.pl"
    bundle.predict([raw])
    assert seen and raw not in seen
    assert seen == bundle.cleaner.clean([raw]).texts
    assert not find_pii(seen[0])


def test_bundle_refuses_a_changed_cleaner(cleaned_run, tmp_path, monkeypatch):
    import shutil

    from jobembed.bundle import load_bundle
    from jobembed.clean import rules

    copy = tmp_path / "bundle"
    shutil.copytree(cleaned_run / "bundle", copy)
    bundle = load_bundle(copy)
    monkeypatch.setattr(rules.RulesCleaner, "fingerprint", property(lambda self: "other-patterns"))
    with pytest.raises(JobembedError, match=r"cleaner differs.*rules_fingerprint"):
        bundle.predict(["Programista Python"])


def test_clean_text_without_a_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="clean_text needs a cleaning backend"):
        load_config(None, {"text_column": "clean_text", "clean.backend": "none"})


def test_no_cleaning_under_clean_text_is_refused_and_keeps_the_run(cleaned_run):
    result = runner.invoke(app, ["clean", "run", str(cleaned_run), "--backend", "none", "--quiet"])
    assert result.exit_code == 1 and "clean_text needs a cleaning backend" in result.output
    result = runner.invoke(app, ["embed", str(cleaned_run), "--quiet"])
    assert result.exit_code == 0 and "up to date" in result.output


# ------------------------------------------------------------------------------------- commands


def test_clean_run_with_gliner2_and_eval(tmp_path, tiny_encoder_dir, tiny_gliner_dir, gold_file):
    cfg = _write_config(tmp_path, _clean_config(tiny_gliner_dir))
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["clean", "eval", "--gold", str(gold_file), "--config", str(cfg), "--out", str(out)])
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())["scores"]
    for match in ("exact", "overlap"):
        assert set(scores[match]["per_label"]) == {"occupation", "skill"}
        assert scores[match]["micro"]["recall"] <= 1.0
    assert scores["overlap"]["micro"]["tp"] >= scores["exact"]["micro"]["tp"]
    rules = runner.invoke(app, ["clean", "eval", "--gold", str(gold_file), "--backend", "rules", "--language", "en"])
    assert rules.exit_code == 0 and "survive" in rules.output


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"id": 1, "text": "ab", "spans": [{"start": 0, "end": 9, "label": "x", "text": "ab"}]}\n', "bad.jsonl:1"),
        ('{"id": 1, "text": "ab", "spans": []}\n{"id": 2, "spans": []}\n', "bad.jsonl:2"),
        (None, "not found"),
    ],
)
def test_clean_eval_bad_gold_is_one_line(tmp_path, content, needle):
    bad = tmp_path / "bad.jsonl"
    if content is not None:
        bad.write_text(content)
    result = runner.invoke(app, ["clean", "eval", "--gold", str(bad), "--backend", "rules"])
    assert result.exit_code == 1 and needle in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_clean_splits_on_a_frame(tmp_path):
    texts = ["Kucharz. Tel. 601 234 567", "Kierowca kat. C. Praca w transporcie. www.firma.pl"]
    frame = pd.DataFrame({"id": ["a", "b"], "text": texts})
    report = clean_splits(
        splits={"train": frame, "val": frame.iloc[:0], "test": frame.iloc[:1]},
        config=CleanConfig(backend="rules", language="pl"),
        out_dir=tmp_path / "clean",
    )
    assert report["rows"] == {"train": 2, "val": 0, "test": 1}
    out = pd.read_parquet(tmp_path / "clean" / "train.parquet")
    assert "601" not in out["clean_text"][0] and "www" not in out["clean_text"][1]
    assert "Kucharz" in out["clean_text"][0] and "kat. C" in out["clean_text"][1]


def test_clean_run_with_gliner2_on_a_run(cleaned_run, tiny_gliner_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(cleaned_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["clean"] = _clean_config(tiny_gliner_dir, threshold=0.05, language="pl").model_dump(mode="json")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["clean", "run", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "clean" / "report.json").read_text())
    assert report["cleaner"]["backend"] == "gliner2" and report["cleaner"]["model_fingerprint"]
    assert sum(report["sources"].values()) == sum(report["rows"].values())
    table = pd.read_parquet(run / "clean" / "train.parquet")
    spans = [json.loads(s) for s in table["spans"]]
    raw = pd.read_parquet(run / "prepare" / "train.parquet")["text"]
    assert any(spans) and all(0 <= s < e <= len(t) for doc, t in zip(spans, raw, strict=True) for s, e, _, _ in doc)
    assert report["pii_check"]["rows_with_pii"] == 0


def test_bundle_carries_a_copied_gliner2_cleaner(cleaned_run, tiny_gliner_dir, tmp_path):
    from jobembed.bundle import EncoderInfo, load_bundle, save_bundle
    from jobembed.config import PipelineConfig

    old = load_bundle(cleaned_run / "bundle")
    config = PipelineConfig.model_validate(
        yaml.safe_load((cleaned_run / "config.yaml").read_text())
        | {"clean": _clean_config(tiny_gliner_dir, threshold=0.05).model_dump(mode="json")}
    )
    info = old.meta.encoder
    path = save_bundle(
        tmp_path / "b",
        model=old.head,
        system="mlp",
        encoder=EncoderInfo(info.source_ref, info.fingerprint, info.precision, info.text_prompt, info.max_seq_length),
        config=config,
        labels=old.labels,
        copy_encoder=True,
    )
    assert (path / "extractor" / "model.safetensors").is_file()
    bundle = load_bundle(path)
    assert bundle.meta.cleaner.config["model"] == "./extractor"
    assert bundle.cleaner.model_fingerprint == bundle.meta.cleaner.info["model_fingerprint"]
    raw = "Nurse who knows Python and Excel. Kontakt: jan.kowalski@example.com"
    [prediction] = bundle.predict([raw])
    assert prediction.label in set(bundle.head.classes_) | {bundle.classify_defaults.uncertain_label}
    assert "@" not in bundle.prepare_texts([raw])[0]
