"""finetune: the class-aware loss, the triplet reader, the stage through the CLI, and resuming a killed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from jobembed.cli import app
from jobembed.errors import DataError
from jobembed.finetune import class_aware_mnrl, load_triplets
from tests.synthetic import tiny_finetune_run

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})


@pytest.fixture(scope="module")
def st_model(tiny_encoder_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(tiny_encoder_dir), device="cpu")


def _embeddings(n=4, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g) for _ in range(3)]


def test_class_aware_loss_equals_mnrl_when_no_candidate_shares_the_anchor_class(st_model):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    emb = _embeddings()
    n_classes = 8
    labels = torch.tensor([a * n_classes + n for a, n in [(0, 4), (1, 5), (2, 6), (3, 7)]])
    ours = class_aware_mnrl(st_model, n_classes=n_classes).compute_loss_from_embeddings(emb, labels)
    plain = MultipleNegativesRankingLoss(st_model).compute_loss_from_embeddings(emb, labels)
    assert torch.allclose(ours, plain, atol=1e-5)


def test_class_aware_loss_masks_same_class_candidates_but_not_the_own_positive(st_model):
    emb = _embeddings()
    n_classes = 4
    # rows 0 and 1 share class 0; row 2's negative is class 0 too; row 3 is class 3 with a class-2 negative
    labels = torch.tensor([0 * 4 + 1, 0 * 4 + 2, 1 * 4 + 0, 3 * 4 + 2])
    loss = class_aware_mnrl(st_model, n_classes=n_classes)
    got = loss.compute_loss_from_embeddings(emb, labels)
    anchors, candidates = emb[0], torch.cat(emb[1:])
    scores = torch.nn.functional.cosine_similarity(anchors[:, None], candidates[None], dim=-1) * 20
    candidate_cls = torch.tensor([0, 0, 1, 3, 1, 2, 0, 2])
    anchor_cls = torch.tensor([0, 0, 1, 3])
    mask = candidate_cls[None] == anchor_cls[:, None]
    mask[torch.arange(4), torch.arange(4)] = False
    assert mask[0, 1] and mask[1, 0] and mask[0, 6] and not mask[0, 0]
    expected = torch.nn.functional.cross_entropy(scores.masked_fill(mask, float("-inf")), torch.arange(4))
    assert torch.allclose(got, expected, atol=1e-4)


def _triplet_table(tmp_path, **changes):
    frame = pd.DataFrame(
        {
            "anchor": ["kierowca", "nurse", "cook"],
            "positive": ["driver", "pielęgniarka", "kucharz"],
            "negative": ["nurse", "cook", "driver"],
            "anchor_id": ["a", "b", "c"],
            "positive_id": ["d", "e", "f"],
            "negative_id": ["b", "c", "a"],
            "anchor_label": ["83", "22", "51"],
            "negative_label": ["22", "51", "83"],
        }
    )
    for k, v in changes.items():
        if v is None:
            frame = frame.drop(columns=[k])
        else:
            frame[k] = v
    path = tmp_path / "t.parquet"
    frame.to_parquet(path)
    return path


def test_load_triplets_packs_anchor_and_negative_classes_into_one_label(tmp_path):
    t = load_triplets(_triplet_table(tmp_path), classes=["22", "51", "83", "99"])
    assert list(t.frame.columns) == ["anchor", "positive", "negative", "label"]
    k = len(t.classes)
    index = {c: i for i, c in enumerate(t.classes)}
    assert t.frame["label"].tolist() == [index[a] * k + index[n] for a, n in [("83", "22"), ("22", "51"), ("51", "83")]]
    assert t.source["ads_seen"] == sorted("abcdef")


@pytest.mark.parametrize(
    ("changes", "needle"),
    [({"negative": None}, "lacks the columns negative"), ({"positive": ["x", " ", "y"]}, "row 1: positive is empty")],
)
def test_load_triplets_names_the_problem(tmp_path, changes, needle):
    with pytest.raises(DataError, match=needle):
        load_triplets(_triplet_table(tmp_path, **changes))


@pytest.fixture(scope="module")
def ft_workspace(tmp_path_factory, tiny_encoder_dir):
    root = tmp_path_factory.mktemp("finetune")
    finetune = {"epochs": 2, "batch_size": 8, "max_seq_length": 32, "evals_per_epoch": 2}
    cfg = tiny_finetune_run(root, name="ft", model=tiny_encoder_dir, finetune=finetune)
    (root / "ft.yaml").write_text(yaml.safe_dump(cfg))
    return root


def test_finetune_stage_writes_a_model_with_card_and_val_metrics(ft_workspace, tiny_encoder_dir):
    from sentence_transformers import SentenceTransformer

    from jobembed.encoders import model_fingerprint

    run = ft_workspace / "runs" / "ft"
    result = invoke("finetune", run, "-c", ft_workspace / "ft.yaml", "-q")
    assert result.exit_code == 0, result.output
    assert "fine-tuned" in result.output and "validation centroid macro-F1" in result.output
    out = run / "finetune"
    info = json.loads((out / "finetune.json").read_text())
    assert info["fingerprint"] != model_fingerprint(str(tiny_encoder_dir)) and info["class_aware"] is True
    assert info["triplets"]["judge"] == "none" and info["triplets"]["rows"] > 0
    assert "eval_val-centroid_macro_f1" in info["val"] and "eval_val-triplets_cosine_accuracy" in info["val"]
    assert not (out / "checkpoints").exists()  # removed after success unless keep_checkpoints
    card = (out / "model" / "README.md").read_text()
    assert "## jobembed" in card and "judged by `none`" in card and "test split is scored by" in card
    from jobembed.encoders import resolve_prompts

    prompts = json.loads((out / "model" / "jobembed-prompts.json").read_text())
    assert resolve_prompts(str(out / "model"), "auto", "auto") == (prompts["text_prompt"], prompts["label_prompt"])
    vectors = SentenceTransformer(str(out / "model"), device="cpu").encode(["kierowca kat. C"])
    assert vectors.shape[0] == 1
    seen = set(json.loads((out / "ads_seen.json").read_text()))
    test_ids = set(pd.read_parquet(run / "prepare" / "test.parquet")["id"])
    assert seen and not seen & test_ids
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["finetune"]["summary"]["triplets"] == info["triplets"]["rows"]
    again = invoke("finetune", run, "-q")
    assert again.exit_code == 0 and "finetune: up to date" in again.output


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_killed_finetune_resumes_from_its_last_checkpoint(ft_workspace, tmp_path, sig):
    """Issue 23: a re-run after a kill trained every step again; Ctrl-C (SIGINT) must resume as SIGKILL does."""
    cfg = yaml.safe_load((ft_workspace / "ft.yaml").read_text())
    cfg["finetune"] |= {"epochs": 40, "evals_per_epoch": 1}
    cfg["name"] = f"ft-killed-{sig.name}"
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(cfg))
    run = ft_workspace / "runs" / cfg["name"]
    assert invoke("triplets", run, "-c", tmp_path / "long.yaml", "-q").exit_code == 0
    cmd = [sys.executable, "-c", "from jobembed.cli import app; app()", "finetune", str(run), "-q"]
    proc = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    checkpoints = run / "finetune" / "checkpoints"
    deadline = time.time() + 240
    while (
        time.time() < deadline
        and proc.poll() is None
        and not list(checkpoints.glob("*/checkpoint-*/trainer_state.json"))
    ):
        time.sleep(0.1)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    time.sleep(0.5)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    saved = list(checkpoints.glob("*/checkpoint-*"))
    assert saved  # checkpoints live outside the stage's swap, under the stage key: the kill leaves them
    done = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    info = json.loads((run / "finetune" / "finetune.json").read_text())
    assert info["resumed_from"] is not None and info["resumed_from"].startswith("checkpoint-")
    log = [json.loads(line) for line in (run / "finetune" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["epoch"] == pytest.approx(40, abs=0.01)


def test_a_triplet_file_without_ids_is_reported_as_unchecked(ft_workspace, tmp_path):
    cfg = yaml.safe_load((ft_workspace / "ft.yaml").read_text())
    cfg["name"] = "ft-bare"
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(cfg))
    run = ft_workspace / "runs" / "ft-bare"
    assert invoke("triplets", run, "-c", tmp_path / "mine.yaml", "-q").exit_code == 0
    bare = tmp_path / "bare.parquet"  # an outside file: texts only, as from another tool
    pd.read_parquet(run / "triplets" / "train.parquet")[["anchor", "positive", "negative"]].to_parquet(bare)
    cfg["finetune"] |= {"enabled": True, "triplets": str(bare)}
    cfg["report"] = {"cv_folds": 3, "bootstrap": 50, "tfidf": {"max_features": 2000}}
    (tmp_path / "bare.yaml").write_text(yaml.safe_dump(cfg))
    result = invoke("run", "-c", tmp_path / "bare.yaml", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "finetune" / "finetune.json").read_text())["ads_seen"] == 0
    tuned = json.loads((run / "report" / "metrics.json").read_text())["finetuned"]["systems"]
    assert tuned and all(r["cv"] is None and "carry no ad ids" in r["cv_note"] for r in tuned.values())


def test_a_checkpoint_cut_short_by_a_kill_is_not_resumed_from(tmp_path):
    from jobembed.finetune import last_complete_checkpoint

    for step, state in ((10, "{}"), (20, None), (30, '{"global_st')):  # 20: killed before the state, 30: during it
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert last_complete_checkpoint(tmp_path / "missing") is None
    (tmp_path / "checkpoint-10" / "trainer_state.json").unlink()
    assert last_complete_checkpoint(tmp_path) is None


def test_a_fine_tuned_folder_keeps_the_prompts_it_was_trained_with(tmp_path):
    from jobembed.encoders import PROMPTS_SIDECAR, resolve_prompts

    folder = tmp_path / "runs" / "pl" / "finetune" / "model"  # the name names no family: no prompt by name
    folder.mkdir(parents=True)
    assert resolve_prompts(str(folder), "auto", "auto") == (None, None)
    (folder / PROMPTS_SIDECAR).write_text(json.dumps({"text_prompt": "query: ", "label_prompt": "query: "}))
    assert resolve_prompts(str(folder), "auto", "auto") == ("query: ", "query: ")
    assert resolve_prompts(str(folder), "passage: ", None) == ("passage: ", None)  # explicit settings still win


def test_compare_report_adds_the_fine_tuned_encoder_on_the_test_split_only(ft_workspace, tmp_path):
    cfg = yaml.safe_load((ft_workspace / "ft.yaml").read_text())
    cfg["finetune"]["enabled"] = True
    cfg["name"] = "ft-report"
    cfg["report"] = {"cv_folds": 3, "bootstrap": 50, "tfidf": {"max_features": 2000}}
    (tmp_path / "on.yaml").write_text(yaml.safe_dump(cfg))
    result = invoke("run", "-c", tmp_path / "on.yaml", "-q")
    assert result.exit_code == 0, result.output
    run = ft_workspace / "runs" / "ft-report"
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    tuned = metrics["finetuned"]["systems"]
    assert tuned and all(r["cv"] is None and "saw the labels" in r["cv_note"] for r in tuned.values())
    assert not set(tuned) & set(metrics["ranking"])  # never ranked (nor bundled) by a leaky CV
    frozen = {r["system"]: k for k, r in metrics["systems"].items() if r["system"] != "tfidf"}
    for r in tuned.values():
        assert set(r["mcnemar_vs"]) == {frozen[r["system"]], "tfidf"}
    assert metrics["finetuned"]["source"]["judge"] == "none"
    report = (run / "report" / "report.md").read_text()
    assert "## Fine-tuned encoder (test split only)" in report and "cross-validation" in report
    # the same folder loaded as an ordinary encoder would be cross-validated over ads it learned: refused
    import shutil

    shutil.copytree(run / "finetune" / "model", tmp_path / "tuned-copy")
    leaky = cfg | {"embed": cfg["embed"] | {"extra_models": [str(tmp_path / "tuned-copy")]}}
    (tmp_path / "leaky.yaml").write_text(yaml.safe_dump(leaky))
    refused = invoke("report", run, "-c", tmp_path / "leaky.yaml", "-q")
    assert refused.exit_code == 1 and "was fine-tuned on triplets holding" in refused.output
    assert "Traceback" not in refused.output and "extra_models: []" in refused.output
    # the embed stage that ran for it stuck to the run's config (-c layers on it): the fix the line names works
    (tmp_path / "on.yaml").write_text(yaml.safe_dump(cfg | {"embed": cfg["embed"] | {"extra_models": []}}))
    # a fine-tuned system can be served: the winner's kind on the fine-tuned encoder, which the bundle copies
    from jobembed.bundle import load_bundle

    bundled = invoke("bundle", run, "-c", tmp_path / "on.yaml", "--encoder", "finetuned", "-q")
    assert bundled.exit_code == 0, bundled.output
    meta = json.loads((run / "bundle" / "bundle.json").read_text())
    assert meta["encoder"]["ref"] == "./encoder" and meta["encoder"]["source_ref"].endswith("finetune/model")
    assert meta["system"] == metrics["systems"][metrics["bundled"]]["system"] and meta["metrics"]["cv"] is None
    assert meta["metrics"]["trained_on"]["judge"] == "none"
    tuned_key = next(k for k, r in tuned.items() if r["system"] == meta["system"])
    bundle = load_bundle(run / "bundle", device="cpu")
    test = pd.read_parquet(run / "prepare" / "test.parquet")
    # the bundle answers as the report's fitted system did on the test ads
    loose = bundle.meta.classify.model_copy(update={"min_confidence": 0.0})
    got = [p.label for p in bundle.predict(test["text"].tolist(), config=loose)]
    accuracy = sum(g == y for g, y in zip(got, test["label"].astype(str), strict=True)) / len(test)
    assert accuracy == pytest.approx(tuned[tuned_key]["test"]["accuracy"], abs=1e-9)
    cfg["finetune"]["enabled"] = False
    cfg["bundle"] = {"encoder": "frozen"}  # `bundle --encoder finetuned` above stuck to the run's config.yaml
    (tmp_path / "off.yaml").write_text(yaml.safe_dump(cfg))
    result = invoke("run", "-c", tmp_path / "off.yaml", "-q")
    assert result.exit_code == 0, result.output
    assert "finetune: off" in result.output and "report: running" in result.output
    # issue 19: a disabled stage keeps what it made (GPU hours); it is just not read
    assert (run / "finetune" / "model").is_dir() and (run / "finetune" / "finetune.json").is_file()
    assert [p for p in (run / "embed-finetuned").iterdir() if p.is_dir()]
    assert "finetuned" not in json.loads((run / "report" / "metrics.json").read_text())
    lost = invoke("bundle", run, "-c", tmp_path / "off.yaml", "--encoder", "finetuned", "-q")
    assert lost.exit_code == 1 and "finetune is off" in lost.output


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"],
    # --multi_gpu is accelerate's name for multi-process DDP; without a GPU it runs on gloo
    "accelerate": [
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ],
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_two_process_ddp_on_cpu_trains_once_and_only_rank_0_writes(ft_workspace, tmp_path, launcher):
    """2 CPU processes (gloo) under torchrun or accelerate launch: rank 0 runs the stages before the fine-tune, both
    ranks train, one model, stamp and manifest entry come out, and the CLI reports once."""
    cfg = yaml.safe_load((ft_workspace / "ft.yaml").read_text())
    cfg["name"] = f"ft-ddp-{launcher}"
    cfg["finetune"] |= {"batch_size": 4}
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(cfg))
    run = ft_workspace / "runs" / cfg["name"]
    env = dict(os.environ) | {"OMP_NUM_THREADS": "1"}
    port = ["--master-port" if launcher == "torchrun" else "--main_process_port", str(_free_port())]
    job = ["-m", "jobembed", "finetune", str(run), "-c", str(tmp_path / "ddp.yaml"), "-q"]
    cmd = [sys.executable, *LAUNCHERS[launcher], *port, *job]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("fine-tuned") == 1  # rank 0 reports; rank 1 stays quiet
    assert done.stdout.count("prepare: running") == 1  # ran once, by rank 0
    info = json.loads((run / "finetune" / "finetune.json").read_text())
    assert info["steps"] > 0 and (run / "finetune" / "model" / "model.safetensors").is_file()
    manifest = json.loads((run / "manifest.json").read_text())
    assert set(manifest["stages"]) >= {"prepare", "triplets", "finetune"}
    # each of the 2 ranks sees half of every epoch's batches: half the steps of one process at the same batch size
    rows = info["triplets"]["rows"]
    assert info["steps"] == pytest.approx(cfg["finetune"]["epochs"] * rows / (2 * 4), abs=2)
    again = invoke("finetune", run, "-q")
    assert again.exit_code == 0 and "finetune: up to date" in again.output


TEXTS = ["kierowca kat. C, praca w trasach", "pielęgniarka", "kucharz w restauracji, praca zmianowa od zaraz", "x"]


@pytest.mark.parametrize("prompt", [None, "query: "])
def test_pretokenized_batches_equal_the_trainers_own(st_model, prompt):
    from sentence_transformers.sentence_transformer.data_collator import SentenceTransformerDataCollator

    from jobembed.finetune import pretokenized_collator, token_table

    features = [
        {"anchor": a, "positive": p, "negative": n, "label": i}
        for i, (a, p, n) in enumerate([(TEXTS[0], TEXTS[1], TEXTS[2]), (TEXTS[3], TEXTS[0], TEXTS[1])])
    ]
    plain = SentenceTransformerDataCollator(preprocess_fn=st_model.preprocess, prompts=prompt or {})(features)
    table, extra = token_table(st_model, TEXTS, prompt=prompt, chunk=3)  # chunks pad differently: padding removed
    ours = pretokenized_collator(st_model, table, extra, multiple_of=None)(features)
    assert set(ours) == set(plain)
    for key, value in plain.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(ours[key], value), key
        else:
            assert ours[key] == value, key
    padded = pretokenized_collator(st_model, table, extra, multiple_of=8)(features)
    assert padded["anchor_input_ids"].shape[1] % 8 == 0
    assert torch.equal(padded["anchor_attention_mask"].sum(1), plain["anchor_attention_mask"].sum(1))


def test_pretokenized_collator_falls_back_to_tokenising_unknown_texts(st_model):
    from jobembed.finetune import pretokenized_collator, token_table

    table, extra = token_table(st_model, TEXTS[:1], prompt=None)
    batch = pretokenized_collator(st_model, table, extra, multiple_of=None)([{"anchor": "nowy tekst", "label": 0}])
    assert batch["anchor_input_ids"].shape[0] == 1 and batch["label"].tolist() == [0]


def test_length_grouped_batches_cover_every_row_once_and_cut_padding():
    from jobembed.finetune import length_grouped_batches

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 300, (1000,), generator=g).tolist()
    sampler = length_grouped_batches(lengths, window=5)(list(range(1000)), batch_size=16, drop_last=False, seed=3)
    first = list(sampler)
    assert sorted(i for b in first for i in b) == list(range(1000)) and len(first) == len(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first  # reshuffled each epoch
    sampler.set_epoch(0)
    assert list(sampler) == first  # and reproducible

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    shuffled = torch.randperm(1000, generator=g).tolist()
    assert padding(first) < 0.3 * padding([shuffled[k : k + 16] for k in range(0, 1000, 16)])


def test_speed_levers_do_not_change_what_is_learned_but_grouping_is_part_of_the_identity(ft_workspace, tmp_path):
    """Pre-tokenised and tokenised-per-step training give the same weights (same batches, same seed)."""
    from safetensors.torch import load_file

    weights = {}
    for flag in ("--pretokenize", "--no-pretokenize"):
        cfg = yaml.safe_load((ft_workspace / "ft.yaml").read_text())
        cfg["name"] = f"ft{flag}"
        cfg["finetune"] |= {"epochs": 1, "evals_per_epoch": 1}
        (tmp_path / f"{flag}.yaml").write_text(yaml.safe_dump(cfg))
        run = ft_workspace / "runs" / cfg["name"]
        result = invoke("finetune", run, "-c", tmp_path / f"{flag}.yaml", flag, "-q")
        assert result.exit_code == 0, result.output
        weights[flag] = load_file(run / "finetune" / "model" / "model.safetensors")
    a, b = weights.values()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the flag is a runtime setting: flipping it leaves the stage current; grouping by length re-runs it
    assert "finetune: up to date" in invoke("finetune", run, "--pretokenize", "-q").output
    grouped = invoke("finetune", run, "--group-by-length", "-q")
    assert grouped.exit_code == 0 and "finetune: running" in grouped.output


def test_load_triplets_refuses_an_empty_table_with_one_line(tmp_path):
    path = tmp_path / "empty.parquet"
    pd.DataFrame({"anchor": [], "positive": [], "negative": []}, dtype=str).to_parquet(path)
    with pytest.raises(DataError, match="holds 0 triplets: too few to fine-tune on"):
        load_triplets(path)
