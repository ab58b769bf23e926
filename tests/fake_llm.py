"""A small deterministic OpenAI-compatible chat-completions server on loopback, for tests and benchmarks.

It answers the judge's prompts like a careful (keyword) judge: an ad's occupation is the class of
``tests.synthetic.OCCUPATIONS`` whose words it mentions most, so verdicts are predictable from the texts.
Faults are scripted: ``server.faults`` is a FIFO of what the next requests get instead of a normal answer:

- ``("429", seconds)``: HTTP 429 with ``Retry-After: seconds``
- ``("500", None)``: HTTP 500; ``("401", None)``: HTTP 401 (not retryable)
- ``("timeout", seconds)``: sleep this long before answering (longer than the client's timeout)
- ``("malformed", None)``: HTTP 200 whose content is not JSON
- ``("slow", seconds)``: sleep, then a normal answer

``server.requests`` logs every request as ``(cache key, outcome)``; ``latency`` delays every answer;
``occupation`` (text -> job) replaces the keyword judge and ``count_tokens`` the chars/4 usage count.
Run as a script (``python tests/fake_llm.py --port 0 --latency 0.2``) it serves until killed and prints its URL.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobembed.triplets.client import call_key
from tests.synthetic import OCCUPATIONS

_BLOCK = re.compile(r"<<<\n(.*?)\n>>>", re.S)
_FILED = re.compile(r"filed under category (\S+) ")


def occupation(text: str) -> str | None:
    """The class whose keywords the text mentions most (None when it mentions none)."""
    low = text.lower()
    scores = {code: sum(low.count(w.lower()) for w in words) for code, (_, words) in OCCUPATIONS.items()}
    best = max(scores, key=lambda c: scores[c])
    return best if scores[best] else None


def verdict(body: dict[str, Any], occupation: Callable[[str], str | None] = occupation) -> dict[str, Any]:
    """The judge's answer to one request of the pointwise or listwise schema; ``occupation`` reads an ad's job."""
    user = body["messages"][-1]["content"]
    blocks = _BLOCK.findall(user)
    filed = _FILED.search(user)
    schema = body["response_format"]["json_schema"]["schema"]
    codes = schema["properties"]["anchor_category"]["enum"]
    anchor = occupation(blocks[0])
    category = anchor if anchor in codes else (filed.group(1) if filed else codes[0])
    if "positive_same_occupation" in schema["properties"]:
        return {
            "anchor_category": category,
            "positive_same_occupation": occupation(blocks[1]) == anchor,
            "negative_different_occupation": occupation(blocks[2]) != anchor,
            "reason": "keyword judge",
        }
    same = [i for i, b in enumerate(blocks[1:], start=1) if occupation(b) == anchor]
    return {
        "anchor_category": category,
        "same_occupation": same,
        "different_occupation": [i for i in range(1, len(blocks)) if i not in same],
        "reason": "keyword judge",
    }


class FakeLLM:
    """Start with ``FakeLLM().start()``; ``url`` is the base URL for the client (``.../v1``)."""

    def __init__(
        self,
        *,
        latency: float = 0.0,
        port: int = 0,
        occupation: Callable[[str], str | None] = occupation,
        count_tokens: Callable[[str], int] = lambda text: len(text) // 4,
    ) -> None:
        self.latency = latency
        self.occupation = occupation
        self.count_tokens = count_tokens
        self.faults: deque[tuple[str, float | None]] = deque()
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                key = call_key(body)
                with server.lock:
                    fault = server.faults.popleft() if server.faults else None
                kind, arg = fault or ("ok", None)
                with server.lock:
                    server.requests.append((key, kind))
                if kind == "429":
                    return self._send(
                        429, {"error": {"message": "rate limited", "type": "rate_limit"}}, {"Retry-After": str(arg)}
                    )
                if kind == "401":
                    return self._send(401, {"error": {"message": "Incorrect API key", "type": "invalid_request_error"}})
                if kind == "500":
                    return self._send(500, {"error": {"message": "internal error", "type": "server_error"}})
                if kind in ("timeout", "slow"):
                    time.sleep(float(arg or 0))
                if server.latency:
                    time.sleep(server.latency)
                content = "this is not JSON {" if kind == "malformed" else json.dumps(verdict(body, server.occupation))
                prompt = sum(server.count_tokens(m["content"]) for m in body["messages"])
                completion = server.count_tokens(content)
                self._send(
                    200,
                    {
                        "id": "chatcmpl-fake",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                        ],
                        "usage": {
                            "prompt_tokens": prompt,
                            "completion_tokens": completion,
                            "total_tokens": prompt + completion,
                        },
                    },
                )

            def _send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): nothing to answer

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

        self.httpd = Server(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def start(self) -> FakeLLM:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def count(self, kind: str | None = None) -> int:
        with self.lock:
            return sum(1 for _, k in self.requests if kind is None or k == kind)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    fake = FakeLLM(latency=args.latency, port=args.port).start()
    print(fake.url, flush=True)
    threading.Event().wait()
