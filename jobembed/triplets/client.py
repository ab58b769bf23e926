"""Many chat-completion calls, fast and exactly once: bounded concurrency, rate limits, retries, a persistent cache.

- **One network call**, ``_complete``: the official ``openai`` client's ``chat.completions.create`` against
  any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp). The client's own retries are off; the
  loop here retries 429, 5xx, timeouts and dropped connections with exponential backoff and jitter, and waits
  at least what ``Retry-After`` / ``retry-after-ms`` ask for.
- **Concurrency** is a fixed number of asyncio workers pulling from one queue (no task per call, so 100k calls
  cost no more memory than 100), under a requests- and tokens-per-minute token bucket.
- **Cache**: every parsed reply is written to the shared store (kind ``llm-call``) the moment it arrives,
  keyed by (endpoint model, prompt hash, schema hash). A re-run, or a run killed and started again, sends no
  call whose answer is stored. Records hold the prompt messages too (for audit and Batch import), so the
  cache holds the ad texts the judge read: it lives in ``<cache>/store.sqlite3``.
- **Money**: tokens are counted from each reply's ``usage``; ``max_cost`` stops taking new calls before the
  spend plus the worst case of the calls in flight would pass it (the run is resumable); ``plan`` estimates
  calls, tokens and cost before anything is sent (``--dry-run``), and ``write_batch`` / ``import_batch``
  go through the OpenAI Batch API (half price) instead.

The API key comes from ``OPENAI_API_KEY`` only and is handed to the client, never to a config, log, record
or file.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import ipaddress
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from jobembed import ui
from jobembed.artifacts import atomic_write_text
from jobembed.errors import ConfigError, DataError, JobembedError
from jobembed.sections import LLMConfig
from jobembed.store import Store
from jobembed.triplets.llm import ReplyError

RECORD_KIND = "llm-call"
_RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
# Chars per token for the estimates before a reply's usage is known: Polish and Danish run ~3.5 with GPT-4o's
# tokenizer (English ~4), so estimates err on the expensive side.
_CHARS_PER_TOKEN = 3.5
_MAX_WAIT = 120.0


class LLMError(JobembedError):
    """The endpoint refused a call in a way retrying cannot fix (bad key, unknown model, bad request)."""


class BudgetReached(JobembedError):
    """``max_cost`` stopped the run; answered calls are cached and a re-run resumes."""


@dataclass
class Call:
    """One chat completion to make: its cache ``key``, the request ``body`` and a ``parse`` for its reply."""

    key: str
    body: dict[str, Any]
    parse: Callable[[str], dict[str, Any]]
    prompt_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.prompt_tokens:
            self.prompt_tokens = estimate_tokens(self.body["messages"])


@dataclass
class CallStats:
    """What a batch of calls cost and how it went; ``http_requests`` counts every attempt sent."""

    calls: int = 0
    cached: int = 0
    answered: int = 0
    unparsable: int = 0
    failed: int = 0
    skipped_by_budget: int = 0
    http_requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Tokens the cached answers cost when they were made (for tokens per kept triplet over the whole job).
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    cost: float = 0.0
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["cost"] = round(self.cost, 6)
        out["seconds"] = round(self.seconds, 2)
        return out


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def call_key(body: dict[str, Any]) -> str:
    """``model|prompt hash|schema hash``: the same question to the same model is answered once."""
    return f"{body['model']}|{_sha(body['messages'])[:32]}|{_sha(body.get('response_format'))[:16]}"


def estimate_tokens(messages: list[dict[str, str]]) -> int:
    return math.ceil(sum(len(m["content"]) for m in messages) / _CHARS_PER_TOKEN) + 4 * len(messages)


def cost_of(prompt_tokens: float, completion_tokens: float, config: LLMConfig) -> float:
    return (prompt_tokens * config.price_input_per_1m + completion_tokens * config.price_output_per_1m) / 1e6


def is_loopback(base_url: str | None) -> bool:
    """True for an endpoint on this machine (localhost, 127.0.0.0/8, ::1); None is api.openai.com."""
    if not base_url:
        return False
    host = urlparse(base_url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key(config: LLMConfig) -> str:
    """``OPENAI_API_KEY``; a local server without auth gets a placeholder, a remote endpoint without one fails."""
    key = os.environ.get("OPENAI_API_KEY", "").strip()
    if key:
        return key
    if is_loopback(config.base_url):
        return "EMPTY"  # vLLM, llama.cpp and Ollama accept any key unless started with one
    raise ConfigError(
        f"the llm judge needs an API key for {config.base_url or 'api.openai.com'}",
        found="OPENAI_API_KEY is not set",
        fix="export OPENAI_API_KEY=... (it is read from the environment only, never from a config file)",
    )


# ----------------------------------------------------------------------------------------- the network call


def make_client(config: LLMConfig, key: str):
    from openai import AsyncOpenAI

    return AsyncOpenAI(api_key=key, base_url=config.base_url, timeout=config.timeout, max_retries=0)


async def _complete(client, body: dict[str, Any]) -> tuple[str, dict[str, int]]:
    """One chat completion: ``(content, usage)``. The only function that talks to the network."""
    reply = await client.chat.completions.create(**body)
    content = reply.choices[0].message.content if reply.choices else ""
    usage = reply.usage
    return content or "", {
        "prompt_tokens": int(getattr(usage, "prompt_tokens", 0) or 0),
        "completion_tokens": int(getattr(usage, "completion_tokens", 0) or 0),
    }


# ----------------------------------------------------------------------------------------- limits and retries


class RateLimiter:
    """Token buckets for requests and tokens per minute (either may be None: no limit)."""

    def __init__(self, rpm: int | None, tpm: int | None) -> None:
        self.rpm, self.tpm = rpm, tpm
        self.requests = float(rpm or 0)
        self.tokens = float(tpm or 0)
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    async def acquire(self, tokens: int) -> None:
        if self.rpm is None and self.tpm is None:
            return
        async with self.lock:
            tokens = min(tokens, self.tpm) if self.tpm else 0
            while True:
                now = time.monotonic()
                elapsed, self.stamp = now - self.stamp, now
                if self.rpm:
                    self.requests = min(self.rpm, self.requests + elapsed * self.rpm / 60)
                if self.tpm:
                    self.tokens = min(self.tpm, self.tokens + elapsed * self.tpm / 60)
                short_r = 1 - self.requests if self.rpm else 0
                short_t = tokens - self.tokens if self.tpm else 0
                if short_r <= 0 and short_t <= 0:
                    if self.rpm:
                        self.requests -= 1
                    if self.tpm:
                        self.tokens -= tokens
                    return
                wait = max(
                    short_r * 60 / self.rpm if self.rpm and short_r > 0 else 0,
                    short_t * 60 / self.tpm if self.tpm and short_t > 0 else 0,
                )
                await asyncio.sleep(min(wait, 5.0))


def retry_after(error: Exception) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms``, ``retry-after`` in seconds or an HTTP date)."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _classify(error: Exception) -> tuple[bool, str]:
    """``(retryable, short name)`` for an exception from ``_complete``."""
    import openai

    if isinstance(error, openai.APITimeoutError):
        return True, "timeout"
    if isinstance(error, openai.APIConnectionError):
        return True, "connection"
    if isinstance(error, openai.APIStatusError):
        return error.status_code in _RETRYABLE_STATUS or error.status_code >= 500, f"http {error.status_code}"
    return False, type(error).__name__


def _backoff(attempt: int, base: float) -> float:
    """Exponential backoff with jitter: base x 2^attempt, scaled by a random 0.5-1.5, capped."""
    return min(_MAX_WAIT, base * 2**attempt) * (0.5 + random.random())


# ----------------------------------------------------------------------------------------- running


def cached_replies(store: Store, calls: list[Call]) -> dict[str, dict[str, Any]]:
    """The stored records of the calls already answered."""
    return store.get_records(RECORD_KIND, [c.key for c in calls])


def run_calls(
    calls: list[Call], *, config: LLMConfig, store: Store, progress: bool = True, description: str = "judging"
) -> tuple[dict[str, dict[str, Any]], CallStats]:
    """Answer every call: from the store where answered before, else from the endpoint.

    Returns:
        ``(parsed, stats)``: cache key -> parsed reply for every call answered (now or before); calls that
        failed, stayed unparsable or were stopped by ``max_cost`` are missing and counted in ``stats``.

    Raises:
        LLMError: the endpoint refused a call for good (bad key, unknown model, unsupported request).
        BudgetReached: ``max_cost`` stopped the run before every call was answered.
    """
    unique = list({c.key: c for c in calls}.values())
    stats = CallStats(calls=len(unique))
    parsed: dict[str, dict[str, Any]] = {}
    records = cached_replies(store, unique)
    todo = []
    for call in unique:
        record = records.get(call.key)
        if record is not None:
            try:
                parsed[call.key] = call.parse(record["content"])
                stats.cached += 1
                stats.cached_prompt_tokens += int(record.get("usage", {}).get("prompt_tokens", 0))
                stats.cached_completion_tokens += int(record.get("usage", {}).get("completion_tokens", 0))
                continue
            except ReplyError:
                pass  # stored by an older parser that accepted it: ask again
        todo.append(call)
    if todo:
        started = time.perf_counter()
        asyncio.run(
            _run_all(
                todo, parsed=parsed, stats=stats, config=config, store=store, progress=progress, description=description
            )
        )
        stats.seconds = time.perf_counter() - started
    if stats.skipped_by_budget:
        raise BudgetReached(
            f"stopped before llm.max_cost ${config.max_cost:g}: {stats.answered} calls answered now "
            f"(${stats.cost:.4f}), {stats.cached} from the cache, {stats.skipped_by_budget} not sent",
            fix="re-run with a higher --max-cost to finish; answered calls are cached and not paid for again",
        )
    return parsed, stats


async def _run_all(
    todo: list[Call],
    *,
    parsed: dict[str, dict[str, Any]],
    stats: CallStats,
    config: LLMConfig,
    store: Store,
    progress: bool,
    description: str,
) -> None:
    client = make_client(config, api_key(config))
    limiter = RateLimiter(config.requests_per_minute, config.tokens_per_minute)
    queue: asyncio.Queue[Call] = asyncio.Queue()
    for call in todo:
        queue.put_nowait(call)
    reserved = {"cost": 0.0}
    stop = asyncio.Event()
    fatal: list[BaseException] = []
    with ui.bar(enabled=progress) as bar:
        task = bar.add_task(f"{description} ({config.model})", total=len(todo))

        def worst_case(call: Call) -> float:
            return cost_of(call.prompt_tokens, call.body.get("max_tokens") or config.max_tokens, config)

        async def worker() -> None:
            while not stop.is_set():
                try:
                    call = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                if config.max_cost is not None and stats.cost + reserved["cost"] + worst_case(call) > config.max_cost:
                    # the first worker to stop counts the queue too; later ones only the call they hold
                    stats.skipped_by_budget += 1 + (0 if stop.is_set() else queue.qsize())
                    stop.set()
                    return
                reserved["cost"] += worst_case(call)
                try:
                    await _one(call)
                except LLMError as e:
                    fatal.append(e)
                    stop.set()
                finally:
                    reserved["cost"] -= worst_case(call)
                bar.update(
                    task,
                    advance=1,
                    description=f"{description} ({config.model}, {stats.prompt_tokens + stats.completion_tokens:,} "
                    f"tokens, ${stats.cost:.4f})",
                )

        async def _one(call: Call) -> None:
            parse_tries = 0
            attempt = 0
            while True:
                await limiter.acquire(call.prompt_tokens + (call.body.get("max_tokens") or 0))
                stats.http_requests += 1
                try:
                    content, usage = await _complete(client, call.body)
                except Exception as error:  # every failure is classified; nothing escapes as a traceback
                    retryable, name = _classify(error)
                    stats.errors[name] = stats.errors.get(name, 0) + 1
                    if not retryable:
                        raise LLMError(
                            f"the endpoint {config.base_url or 'api.openai.com'} refused a call ({name}: "
                            f"{' '.join(str(error).split())[:160]})",
                            fix="check --base-url, --llm-model and OPENAI_API_KEY; answered calls are cached",
                        ) from None
                    if attempt >= config.max_retries:
                        stats.failed += 1
                        return
                    wait = max(_backoff(attempt, config.backoff_base), min(retry_after(error) or 0.0, _MAX_WAIT))
                    attempt += 1
                    stats.retries += 1
                    await asyncio.sleep(wait)
                    continue
                stats.prompt_tokens += usage["prompt_tokens"]
                stats.completion_tokens += usage["completion_tokens"]
                stats.cost += cost_of(usage["prompt_tokens"], usage["completion_tokens"], config)
                try:
                    verdict = call.parse(content)
                except ReplyError as e:
                    if parse_tries < config.parse_retries:
                        parse_tries += 1
                        stats.retries += 1
                        continue
                    stats.unparsable += 1
                    stats.errors[f"unparsable: {str(e)[:40]}"] = stats.errors.get(f"unparsable: {str(e)[:40]}", 0) + 1
                    return
                # Stored at once: a kill after this line never pays for this call again.
                store.put_record(
                    RECORD_KIND,
                    call.key,
                    {"content": content, "usage": usage, "messages": call.body["messages"], "at": time.time()},
                )
                parsed[call.key] = verdict
                stats.answered += 1
                return

        try:
            await asyncio.gather(*(worker() for _ in range(min(config.concurrency, len(todo)))))
        finally:
            await client.close()
    if fatal:
        raise fatal[0]


# ----------------------------------------------------------------------------------------- plan and batch


def plan(calls: list[Call], *, config: LLMConfig, store: Store, expected_completion_tokens: int) -> dict[str, Any]:
    """What answering ``calls`` would cost: calls not yet cached, estimated tokens and dollars (nothing sent)."""
    unique = list({c.key: c for c in calls}.values())
    cached = cached_replies(store, unique)
    todo = [c for c in unique if c.key not in cached]
    prompt = sum(c.prompt_tokens for c in todo)
    completion = expected_completion_tokens * len(todo)
    return {
        "calls": len(unique),
        "cached": len(unique) - len(todo),
        "to_send": len(todo),
        "prompt_tokens_est": prompt,
        "completion_tokens_est": completion,
        "cost_est": round(cost_of(prompt, completion, config), 4),
        "batch_cost_est": round(cost_of(prompt, completion, config) / 2, 4),
    }


def write_batch(calls: list[Call], path: Path, *, store: Store) -> int:
    """Write the calls not yet cached as an OpenAI Batch API JSONL (``custom_id`` = cache key); returns lines."""
    unique = list({c.key: c for c in calls}.values())
    cached = cached_replies(store, unique)
    lines = [
        json.dumps(
            {"custom_id": c.key, "method": "POST", "url": "/v1/chat/completions", "body": c.body}, ensure_ascii=False
        )
        for c in unique
        if c.key not in cached
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def import_batch(path: Path, *, store: Store) -> dict[str, int]:
    """Read a Batch API output JSONL into the call cache; returns counts of imported, errored and bad lines."""
    if not path.is_file():
        raise DataError(
            f"--import-batch file {path} not found", fix="pass the output file downloaded from the Batch API"
        )
    counts = {"imported": 0, "errors": 0}
    records = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key = row["custom_id"]
            response = row.get("response") or {}
        except (ValueError, KeyError, TypeError):
            raise DataError(
                f"{path} line {number} is not a Batch API output line",
                expected='{"custom_id": ..., "response": {"status_code": 200, "body": {...}}}',
                fix="pass the output file of the batch made from --batch-file",
            ) from None
        body = response.get("body") or {}
        if row.get("error") or response.get("status_code") != 200 or not body.get("choices"):
            counts["errors"] += 1
            continue
        usage = body.get("usage") or {}
        records[key] = {
            "content": body["choices"][0]["message"].get("content") or "",
            "usage": {
                "prompt_tokens": int(usage.get("prompt_tokens", 0)),
                "completion_tokens": int(usage.get("completion_tokens", 0)),
            },
            "messages": None,
            "at": time.time(),
            "batch": True,
        }
    store.put_records(RECORD_KIND, records)
    counts["imported"] = len(records)
    return counts
