"""The llm judge's call engine against a local OpenAI-compatible server with a fixed latency, on real prompts.

    .venv/bin/python experiments/bench_triplets.py                 # 3,000 pl-jobads ads, 200 ms per call

Prompts are the real ones: triplets' candidates mined on a stratified 3,000-ad sample of pl-jobads
(rules-cleaned text, builtin e5-small vectors), judged pointwise. The server is ``tests/fake_llm.py`` on
loopback (real HTTP, real ``openai`` client), answering every call after a fixed 200 ms.

1. Throughput: the plain-library way (the official ``openai`` client, one call after another) against
   ``jobembed.triplets.client.run_calls`` at concurrency 1 and 32, rate limits off; calls per second.
2. A warm re-run of the same calls: how many reach the server (the call cache should answer all).
3. Tokens per kept triplet, pointwise vs listwise, on the same candidates. The server's judge is scripted to
   agree with the labels, so both modes keep the same triplets and the difference is the prompts alone; tokens
   are counted with the XLM-R tokenizer of multilingual-e5 (a stand-in for the endpoint's own tokenizer).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from common import OUT, ROOT, pl_jobads

sys.path.insert(0, str(ROOT))

from jobembed import encoders
from jobembed.config import load_config
from jobembed.sections import JudgeMode
from jobembed.stages import pin_models, run_stages, triplet_inputs
from jobembed.store import Store
from jobembed.triplets import client, core
from tests.fake_llm import FakeLLM


def plain_openai(url: str, calls: list[client.Call]) -> float:
    """The plain-library way: one ``chat.completions.create`` after another. Returns seconds."""
    from openai import OpenAI

    api = OpenAI(base_url=url, api_key="EMPTY", max_retries=0)
    started = time.perf_counter()
    for call in calls:
        api.chat.completions.create(**call.body)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-rows", type=int, default=3000)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--serial-calls", type=int, default=40, help="calls for the one-at-a-time measurements")
    ap.add_argument("--parallel-calls", type=int, default=640, help="calls for the concurrency-32 measurement")
    args = ap.parse_args()

    overrides = {
        "name": f"bench-triplets-{args.max_rows}",
        "runs_dir": str(OUT),
        "prepare": pl_jobads("isco_submajor", max_rows=args.max_rows, min_class_count=5),
        "clean": {"backend": "rules", "language": "pl"},
        "embed": {"model": "builtin:multilingual-e5-small", "max_seq_length": 256},
        "triplets": {"judge": "llm", "llm": {"model": "bench-judge", "mode": "pointwise"}},
    }
    config = pin_models(load_config(None, overrides))
    run_stages(config, target="embed", progress=False)
    inputs = triplet_inputs(config)
    candidates, _ = core.mine(inputs, config.triplets)
    calls = core.llm_job(inputs, candidates, config.triplets).calls
    need = 2 * args.serial_calls + args.parallel_calls
    assert len(calls) >= need, f"only {len(calls)} calls mined; lower --parallel-calls"
    serial, ours_1, ours_32 = (
        calls[: args.serial_calls],
        calls[args.serial_calls : 2 * args.serial_calls],
        calls[2 * args.serial_calls : need],
    )
    results: dict = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "latency_s": args.latency,
        "prompt_tokens_est_mean": round(sum(c.prompt_tokens for c in calls) / len(calls), 1),
    }

    server = FakeLLM(latency=args.latency).start()
    try:
        fast = config.triplets.llm.model_copy(
            update={"base_url": server.url, "requests_per_minute": None, "tokens_per_minute": None}
        )
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(Path(tmp))
            seconds = plain_openai(server.url, serial)
            results["plain_openai_one_at_a_time_calls_per_s"] = round(len(serial) / seconds, 2)
            _, stats = client.run_calls(
                ours_1, config=fast.model_copy(update={"concurrency": 1}), store=store, progress=False
            )
            # answered / seconds: identical prompts (two ads whose cleaned texts match) are asked once, not twice
            results["jobembed_concurrency_1_calls_per_s"] = round(stats.answered / stats.seconds, 2)
            _, stats = client.run_calls(
                ours_32, config=fast.model_copy(update={"concurrency": 32}), store=store, progress=False
            )
            results["jobembed_concurrency_32_calls_per_s"] = round(stats.answered / stats.seconds, 2)
            results["concurrency_32_calls"] = {
                "listed": len(ours_32),
                "unique": stats.calls,
                "answered": stats.answered,
            }
            results["speedup_vs_plain_one_at_a_time"] = round(
                results["jobembed_concurrency_32_calls_per_s"] / results["plain_openai_one_at_a_time_calls_per_s"], 1
            )
            before = server.count()
            started = time.perf_counter()
            _, stats = client.run_calls(ours_32, config=fast, store=store, progress=False)
            results["warm_rerun"] = {
                "calls": stats.calls,
                "sent_to_server": server.count() - before,
                "cached": stats.cached,
                "seconds": round(time.perf_counter() - started, 3),
            }
    finally:
        server.stop()

    # Tokens per kept triplet: a judge that agrees with the labels, tokens counted by XLM-R's tokenizer.
    from transformers import AutoTokenizer

    location = encoders.resolve("builtin:multilingual-e5-small").location
    tokenizer = AutoTokenizer.from_pretrained(str(location))
    tokenizer.model_max_length = 1_000_000  # counting only: no model sees these ids
    label_of = {}
    for split in core.POOLS:
        for text, label in zip(inputs.judge_texts[split], inputs.frames[split]["label"], strict=True):
            label_of[" ".join(str(text).split())[:100]] = label

    def oracle(text: str) -> str | None:
        return label_of.get(" ".join(text.split())[:100])

    server = FakeLLM(occupation=oracle, count_tokens=lambda t: len(tokenizer(t, add_special_tokens=False).input_ids))
    server.start()
    try:
        results["modes"] = {}
        for mode in JudgeMode:
            triplets = config.triplets.model_copy(
                update={
                    "llm": config.triplets.llm.model_copy(
                        update={
                            "base_url": server.url,
                            "mode": mode,
                            "requests_per_minute": None,
                            "tokens_per_minute": None,
                        }
                    )
                }
            )
            with tempfile.TemporaryDirectory() as tmp:
                report = core.make_triplets(
                    inputs=inputs, config=triplets, out_dir=Path(tmp) / "out", store=Store(Path(tmp)), progress=False
                )
            c = report["llm"]
            results["modes"][str(mode)] = {
                "candidates": report["splits"]["train"]["candidates"] + report["splits"]["val"]["candidates"],
                "calls": c["calls"],
                "prompt_tokens": c["prompt_tokens"],
                "completion_tokens": c["completion_tokens"],
                "kept": report["kept"],
                "tokens_per_kept_triplet": c["tokens_per_kept_triplet"],
            }
    finally:
        server.stop()
    p, l_ = results["modes"]["pointwise"], results["modes"]["listwise"]
    results["listwise_token_saving"] = round(p["tokens_per_kept_triplet"] / l_["tokens_per_kept_triplet"], 2)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bench_triplets.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
