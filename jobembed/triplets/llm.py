"""The LLM judge's words: prompt templates, JSON schemas, ``build_messages`` and ``parse_response``. All pure.

Two modes, the same verdicts:

- ``pointwise``: one call per triplet. Is the positive the same occupation as the anchor? Is the negative a
  different one? Which category does the anchor really belong to?
- ``listwise``: one call per anchor with its k candidates (the positive and the mined negatives, in a
  shuffled order so a position never gives the role away): which candidates are the same occupation,
  which are clearly different (hardest first), and the anchor's category. One prompt carries the anchor and
  the category list once for k triplets, hence far fewer tokens per kept triplet.

Prompts are the template files in ``jobembed/triplets/prompts/`` (``string.Template``, ``$name``), so the
wording can be read and changed without touching code. The category codes and names are in the system
prompt, the anchor's category description in the user prompt. Replies are structured by JSON schema
(``response_format: json_schema``, strict), the distilabel ``GenerateSentencePair`` way; ``parse_response``
still checks every field, because not every OpenAI-compatible server enforces the schema.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from string import Template
from typing import Any

from jobembed.sections import JudgeMode

PROMPTS = Path(__file__).parent / "prompts"
SCHEMA_NAME = "triplet_verdict"


@cache
def template(name: str) -> Template:
    """A prompt template from ``prompts/<name>.txt``."""
    return Template((PROMPTS / f"{name}.txt").read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Category:
    """One category as the judge sees it."""

    code: str
    name: str
    description: str = ""


class ReplyError(ValueError):
    """A reply that is not the schema's JSON (retried, then counted and skipped)."""


def _clip(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def system_prompt(categories: list[Category]) -> str:
    return _system_prompt(tuple(categories))


@cache
def _system_prompt(categories: tuple[Category, ...]) -> str:
    # One string shared by every call of a run: 100k calls hold one copy of the category list, not 100k.
    lines = "\n".join(f"{c.code}: {c.name}" for c in categories)
    return template("system").substitute(categories=lines)


def schema(mode: JudgeMode, *, codes: list[str], n_candidates: int = 0) -> dict[str, Any]:
    """The JSON schema of a reply (strict-mode compatible: every property required, nothing extra)."""
    category = {"type": "string", "enum": list(codes)}
    if JudgeMode(mode) is JudgeMode.pointwise:
        properties: dict[str, Any] = {
            "anchor_category": category,
            "positive_same_occupation": {"type": "boolean"},
            "negative_different_occupation": {"type": "boolean"},
            "reason": {"type": "string"},
        }
    else:
        # maxItems: without a bound a small model under constrained decoding can repeat numbers until max_tokens.
        numbers = {
            "type": "array",
            "items": {"type": "integer", "minimum": 1, "maximum": max(n_candidates, 1)},
            "maxItems": max(n_candidates, 1),
        }
        properties = {
            "anchor_category": category,
            "same_occupation": numbers,
            "different_occupation": numbers,
            "reason": {"type": "string"},
        }
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def response_format(schema_: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": SCHEMA_NAME, "strict": True, "schema": schema_}}


def build_messages(
    item: dict[str, Any], *, mode: JudgeMode, categories: list[Category], max_chars: int = 1200
) -> list[dict[str, str]]:
    """The chat messages for one judgement.

    Args:
        item: pointwise ``{anchor, anchor_label, positive, positive_is_label, negative}``; listwise ``{anchor,
            anchor_label, candidates: [text, ...]}`` (texts as the judge should read them).
        mode: pointwise or listwise.
        categories: every category (code, name, description).
        max_chars: each ad is cut to this many characters (whitespace collapsed).
    """
    by_code = {c.code: c for c in categories}
    own = by_code.get(str(item["anchor_label"]), Category(str(item["anchor_label"]), str(item["anchor_label"])))
    common = {
        "anchor_code": own.code,
        "anchor_name": own.name,
        "anchor_description": _clip(own.description or own.name, 400),
        "anchor": _clip(item["anchor"], max_chars),
    }
    if JudgeMode(mode) is JudgeMode.pointwise:
        is_label = bool(item.get("positive_is_label"))
        user = template("pointwise").substitute(
            common,
            positive_heading="Category P (the category's own description):" if is_label else "Ad P:",
            positive_question=(
                "does Ad A belong to category P?" if is_label else "is Ad P the same occupation as Ad A?"
            ),
            positive=_clip(item["positive"], max_chars),
            negative=_clip(item["negative"], max_chars),
        )
    else:
        listed = "\n".join(
            f"[{i}]\n<<<\n{_clip(text, max_chars)}\n>>>" for i, text in enumerate(item["candidates"], start=1)
        )
        user = template("listwise").substitute(common, candidates=listed)
    return [{"role": "system", "content": system_prompt(categories)}, {"role": "user", "content": user}]


_FENCE = re.compile(r"^\s*```(?:json)?\s*|\s*```\s*$")


def parse_response(text: str | None, *, mode: JudgeMode, codes: list[str], n_candidates: int = 0) -> dict[str, Any]:
    """A reply's verdict, checked field by field.

    Returns:
        pointwise ``{anchor_category, positive_same_occupation, negative_different_occupation, reason}``;
        listwise ``{anchor_category, same_occupation: [0-based], different_occupation: [0-based], reason}``.
        An ``anchor_category`` outside ``codes`` comes back as ``None``.

    Raises:
        ReplyError: not JSON, not an object, a field missing or of the wrong type, a candidate number out of range.
    """
    if not text or not text.strip():
        raise ReplyError("empty reply")
    try:
        data = json.loads(_FENCE.sub("", text))
    except ValueError as e:
        raise ReplyError(f"not JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ReplyError(f"a JSON {type(data).__name__}, not an object")
    category = data.get("anchor_category")
    out: dict[str, Any] = {
        "anchor_category": str(category) if category is not None and str(category) in set(codes) else None,
        "reason": " ".join(str(data.get("reason", "")).split())[:300],
    }
    if JudgeMode(mode) is JudgeMode.pointwise:
        for field in ("positive_same_occupation", "negative_different_occupation"):
            value = data.get(field)
            if not isinstance(value, bool):
                raise ReplyError(f"{field} is {value!r}, not true/false")
            out[field] = value
        return out
    for field in ("same_occupation", "different_occupation"):
        value = data.get(field)
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ReplyError(f"{field} is {value!r}, not a list of candidate numbers")
        if any(not 1 <= v <= n_candidates for v in value):
            raise ReplyError(f"{field} names a candidate outside 1..{n_candidates}: {value}")
        out[field] = [v - 1 for v in dict.fromkeys(value)]
    return out
