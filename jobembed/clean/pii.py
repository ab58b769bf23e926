"""The PII check that runs on cleaning output: what contact data or placeholders are still in a text.

The patterns live in ``patterns/common.yaml`` under ``pii:`` and are the same ones the ``rules`` cleaner removes
(:mod:`jobembed.clean.rules` reads them through :func:`load_pii_patterns`), so a text the rules cleaner produced
passes this check unless a pattern file changed in between.

Kinds (``PII_KINDS``):

- ``email``: ``name@host.tld``.
- ``url``: ``http(s)://...``, ``www....`` and bare domains with a common lowercase top-level domain
  (``firma.pl``, ``job.dk``); ``.NET``, ``Node.js`` and ``C#`` are not URLs.
- ``phone``: Danish 8-digit numbers (``12 34 56 78``), Polish 9-digit mobile and 2+7 landline numbers, and
  international numbers with ``+`` or ``00``. Dates (``16.08.2025``), postcodes (``00-001``), salaries
  (``5000 zł``, ``12 000 - 18 000``) and hours (``7.00-15.00``) are not phones.
- ``placeholder``: anonymisation placeholders such as ``<<PHONE>>``, ``<ORGANIZATION>``, ``<CONTACT>``, ``[EMAIL]``;
  ``<U+202F>``-style escaped characters are not placeholders.
- ``person_name``: person-name placeholders (``<PERSON>``, ``<<NAME>>``, ``[NAVN]``) and ``Kontaktperson: <X>``.
  This is not named-entity recognition: a real name in plain text is not found.

A match is reported under the first kind in ``_PRIORITY`` that covers it, so ``<NAME>`` is a ``person_name`` and not
also a ``placeholder``, and the phone-like digits inside an e-mail address are not a ``phone``.

The module also holds the pattern-file helpers the rules cleaner shares (reading and checking YAML pattern lists,
and :func:`dispatch`, which turns many patterns into one fast regex).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from jobembed.errors import ConfigError

PII_KINDS: tuple[str, ...] = ("email", "phone", "url", "placeholder", "person_name")
PATTERNS_DIR = Path(__file__).with_name("patterns")

# person_name before placeholder (<NAME> is a person), email and url before phone (digits inside addresses).
_PRIORITY: tuple[str, ...] = ("person_name", "email", "url", "placeholder", "phone")


# --- pattern files and regex assembly (shared with rules.py) -----------------------------------------------------


def read_pattern_file(path: Path) -> dict[str, Any]:
    """Read one pattern YAML file as a mapping.

    Args:
        path: a ``*.yaml`` file from a patterns folder.

    Returns:
        The top-level mapping (empty when the file is empty).

    Raises:
        ConfigError: the file is missing, is not valid YAML or is not a mapping.
    """
    if not path.is_file():
        raise ConfigError(
            "pattern file not found", where=str(path), fix="point patterns_dir at a folder with common.yaml"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())[:160]
        raise ConfigError("not valid YAML", where=str(path), found=first, fix="fix the YAML syntax") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("not a mapping", where=str(path), found=type(data).__name__, fix="use `key: [patterns]`")
    return data


def pattern_list(value: Any, *, where: str) -> list[str]:
    """Check that a YAML value is a list of regex strings and return it.

    Raises:
        ConfigError: the value is not a list of strings, or a string is not a valid regex or has a capturing
            group (patterns are joined into one alternation, where numbered groups would collide).
    """
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ConfigError(
            "expected a list of regex strings", where=where, found=repr(value)[:80], fix="write `- 'regex'` items"
        )
    for p in value:
        try:
            compiled = re.compile(p)
        except re.error as e:
            raise ConfigError(f"bad regex {p!r}", where=where, found=str(e), fix="fix the regular expression") from e
        if compiled.groups:
            raise ConfigError(f"regex {p!r} has a capturing group", where=where, fix="use non-capturing groups (?:...)")
    return list(value)


def combine(patterns: Sequence[str], flags: int = 0) -> re.Pattern[str] | None:
    """One alternation of several regexes (``None`` for no patterns: nothing matches)."""
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{p})" for p in patterns), flags)


@dataclass(frozen=True)
class KindPatterns:
    """The patterns of one kind as one regex (see :func:`dispatch`), behind an optional cheap trigger.

    ``trigger`` (from ``triggers:`` in the YAML) is a regex that every match of the kind contains: texts without
    it skip the kind (e-mail addresses need an ``@``).
    """

    kind: str
    regex: re.Pattern[str]
    trigger: re.Pattern[str] | None = None

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Non-empty ``(start, end)`` of the matches, in text order."""
        if self.trigger is not None and not self.trigger.search(text):
            return []
        return [m.span() for m in self.regex.finditer(text) if m.end() > m.start()]


def _class_end(pattern: str, i: int) -> int:
    """Index after the character class that starts at ``pattern[i] == "["``."""
    j = i + 1
    if pattern[j : j + 1] == "^":
        j += 1
    if pattern[j : j + 1] == "]":
        j += 1
    while j < len(pattern) and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
    return j + 1


def _group_end(pattern: str, i: int) -> int:
    """Index after the group that starts at ``pattern[i] == "("``."""
    depth, j = 0, i
    while j < len(pattern):
        c = pattern[j]
        if c == "\\":
            j += 2
            continue
        if c == "[":
            j = _class_end(pattern, j)
            continue
        depth += c == "("
        depth -= c == ")"
        j += 1
        if depth == 0:
            break
    return j


def split_alternatives(pattern: str) -> list[str]:
    """``'a|b(?:c|d)'`` -> ``['a', 'b(?:c|d)']``: the top-level alternatives of a regex (escapes, groups and
    character classes respected); ``[pattern]`` when it has none."""
    parts, depth, start, i, in_class = [], 0, 0, 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            if pattern[i + 1 : i + 2] == "]" or pattern[i + 1 : i + 3] == "^]":
                i += 2 if pattern[i + 1] == "]" else 3  # "[]...]" and "[^]...]": the first ] is literal
                continue
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
        i += 1
    parts.append(pattern[start:])
    return parts if all(parts) else [pattern]


def expand_leading(pattern: str) -> list[str]:
    """``'(?:a|b)?c'`` -> ``['ac', 'bc', 'c']``: spell out a leading group so every alternative starts with text.

    Used with :func:`dispatch`; the alternatives match exactly what the pattern matches.
    """
    if not pattern.startswith("(?:"):
        return [pattern]
    end = _group_end(pattern, 0)
    quantifier = pattern[end : end + 1]
    if (quantifier and quantifier in "*+{") or (pattern[end + 1 : end + 2] in ("?", "+") and quantifier == "?"):
        return [pattern]  # repeated, lazy or possessive: leave it
    rest = pattern[end + (quantifier == "?") :]
    heads = split_alternatives(pattern[3 : end - 1])
    out = [alt for head in heads for alt in expand_leading(head + rest)]
    return out + (expand_leading(rest) if quantifier == "?" and rest else [])


def dispatch(patterns: Sequence[str]) -> str:
    """One regex source for many patterns, factored by first atom: ``'o(?:ferujemy|ferta)|\\d(?:...)|...'``.

    A plain alternation of many patterns makes Python's ``re`` try every alternative at every position; branching
    on the first character (or ``\\d``, ``[abc]``) first is 3-4x faster on pl-jobads. Order is kept within each
    first atom, so earlier (longer) patterns still win there.
    """
    groups: dict[str, list[str]] = {}
    for p in patterns:
        for alt in (a for top in split_alternatives(p) for a in expand_leading(top)):
            head = _first_atom(alt)
            if head and alt[len(head) : len(head) + 1] not in ("?", "*", "{", "+"):
                groups.setdefault(head, []).append(f"(?:{alt[len(head) :]})")
            else:
                groups.setdefault("", []).append(f"(?:{alt})")
    return "|".join(f"{head}(?:{'|'.join(rest)})" if head else "|".join(rest) for head, rest in groups.items())


def _first_atom(pattern: str) -> str:
    """The first character, escape or character class of ``pattern`` ("" for a group, anchor or dot)."""
    c = pattern[:1]
    if c == "\\":
        return pattern[:2] if pattern[1:2] not in ("b", "B", "A", "Z") else ""
    if c == "[":
        return pattern[: _class_end(pattern, 0)]
    return "" if not c or c in "().^$|*+?{" else re.escape(c)


def kind_patterns(kind: str, patterns: Sequence[str], trigger: str | None, *, where: str) -> KindPatterns:
    """Check and compile one kind's patterns and optional trigger (see :class:`KindPatterns`)."""
    trig = pattern_list([trigger], where=f"{where} trigger")[0] if trigger else None
    source = dispatch(pattern_list(list(patterns), where=where)) or "(?!)"
    return KindPatterns(kind, re.compile(source), re.compile(trig) if trig else None)


def load_pii_patterns(patterns_dir: Path | None = None) -> dict[str, KindPatterns]:
    """The ``pii:`` patterns of ``common.yaml`` (with their ``triggers:``), compiled per kind.

    Args:
        patterns_dir: folder holding ``common.yaml``; default the package's own ``patterns/``.

    Returns:
        ``{kind: KindPatterns}`` for every kind in ``PII_KINDS``.

    Raises:
        ConfigError: the file is missing or malformed, or a kind is missing or unknown.
    """
    path = (patterns_dir or PATTERNS_DIR) / "common.yaml"
    data = read_pattern_file(path)
    section, triggers = data.get("pii"), data.get("triggers") or {}
    where = f"{path}: pii"
    if not isinstance(section, dict) or not isinstance(triggers, dict):
        raise ConfigError(
            "missing the `pii:` mapping (or `triggers:` is not a mapping)",
            where=str(path),
            fix=f"add pii: with {', '.join(PII_KINDS)}",
        )
    unknown = sorted(set(section) - set(PII_KINDS))
    missing = [k for k in PII_KINDS if not section.get(k)]
    if unknown or missing:
        raise ConfigError(
            "wrong PII kinds",
            where=where,
            expected=", ".join(PII_KINDS),
            found=f"unknown {unknown}, missing {missing}",
            fix="use exactly these kinds, each with at least one pattern",
        )
    return {k: kind_patterns(k, section[k], triggers.get(k), where=f"{where}.{k}") for k in PII_KINDS}


# --- the check ----------------------------------------------------------------------------------------------------

_DEFAULT: dict[str, KindPatterns] | None = None


def _default_patterns() -> dict[str, KindPatterns]:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = load_pii_patterns()
    return _DEFAULT


def pii_spans(text: str, *, patterns: dict[str, KindPatterns] | None = None) -> list[tuple[int, int]]:
    """Character ``(start, end)`` of every match of every kind in ``text`` (overlaps kept): where personal data
    sits in an ad, so a cleaner can drop anything that touches it."""
    pats = patterns or _default_patterns()
    return [span for kind in pats.values() for span in kind.spans(text)]


def find_pii(text: str, *, patterns: dict[str, KindPatterns] | None = None) -> dict[str, list[str]]:
    """PII left in one text.

    Args:
        text: any text (usually a cleaner's output).
        patterns: from :func:`load_pii_patterns`; default the package's ``common.yaml``.

    Returns:
        ``{kind: [matched strings in text order]}`` with only the kinds found, keys in ``PII_KINDS`` order;
        ``{}`` for a clean text.
    """
    pats = patterns or _default_patterns()
    taken: list[tuple[int, int]] = []
    found: dict[str, list[tuple[int, int]]] = {}
    for kind in _PRIORITY:
        if kind not in pats:
            continue
        for a, b in pats[kind].spans(text):
            if any(s <= a and b <= e for s, e in taken) or (found.get(kind) and found[kind][-1][1] > a):
                continue  # inside a higher-priority match, or overlapping an earlier match of the same kind
            found.setdefault(kind, []).append((a, b))
        taken.extend(found.get(kind, []))
    return {k: [text[a:b].strip() for a, b in found[k]] for k in PII_KINDS if k in found}


def pii_report(
    texts: Sequence[str],
    *,
    ids: Sequence[str] | None = None,
    max_examples: int = 5,
    patterns: dict[str, KindPatterns] | None = None,
) -> dict[str, Any]:
    """Check many texts and summarise what PII is left.

    Args:
        texts: the texts to check (``None`` entries count as empty).
        ids: one id per text for the examples; default the row index as a string.
        max_examples: at most this many ``{"id", "kind", "match"}`` examples (the first ones, in row order).
        patterns: as in :func:`find_pii`.

    Returns:
        ``{"rows_checked": int, "rows_with_pii": int, "by_kind": {kind: rows with that kind},
        "examples": [{"id": str, "kind": str, "match": str}, ...]}``; ``by_kind`` lists every kind, with 0s.

    Raises:
        ValueError: ``ids`` is given with a different length than ``texts``.
    """
    if ids is not None and len(ids) != len(texts):
        raise ValueError(f"ids has {len(ids)} entries but texts has {len(texts)}")
    by_kind = dict.fromkeys(PII_KINDS, 0)
    examples: list[dict[str, str]] = []
    rows_with = 0
    for i, text in enumerate(texts):
        hits = find_pii(text or "", patterns=patterns)
        if not hits:
            continue
        rows_with += 1
        for kind, matches in hits.items():
            by_kind[kind] += 1
            if len(examples) < max_examples:
                examples.append({"id": str(ids[i]) if ids is not None else str(i), "kind": kind, "match": matches[0]})
    return {"rows_checked": len(texts), "rows_with_pii": rows_with, "by_kind": by_kind, "examples": examples}
