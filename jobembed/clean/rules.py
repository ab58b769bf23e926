"""The ``rules`` cleaning backend: regexes from YAML, no model.

:class:`RulesCleaner` rewrites a noisy vacancy text as the job content: title, duties, requirements, skills and
employment terms. Everything it knows is data in ``patterns/common.yaml`` + ``patterns/<language>.yaml``:

1. **Inline removal** (``pii:`` kinds of common.yaml, shared with :mod:`jobembed.clean.pii`, plus ``remove:``):
   e-mail addresses, phone numbers, URLs, anonymisation placeholders (``<<PHONE>>``, ``<ORGANIZATION>``),
   street addresses and postcode + city, each with a contact word in front of it (``tel.``, ``e-mail:``).
2. **Headings** (``headings:``) cut the text into sections, also when the ad is one long line, as most scraped
   ads are ("Wymagania: ... Oferujemy: ... Kontakt do pracodawcy: ..."):

   - ``keep``: duties, requirements, terms; the heading word itself is dropped when it is a label (``Wymagania:``).
   - ``drop_section``: perks, contact/application, consent, employer self-description; everything up to the next
     ``keep`` heading is dropped.
   - ``drop_field``: ``Lokalizacja: Kraków``, ``NIP: ...``; only the value up to the next heading or sentence end.

3. **Sentences** (``drop_sentence:``): a sentence (split on ``. ! ? ;`` and line breaks, not after an
   abbreviation) that matches any pattern is dropped: application instructions, consent clauses, contact
   sentences, employer boilerplate, perks. A sentence that lost contact data and keeps fewer than
   ``min_words_after_pii`` words was a contact line and is dropped too.

Output contract: never ``None``; whitespace collapsed; kept lines joined by a single ``"\\n"``; inside a line,
kept sentences that were separated by dropped text are joined with ``". "`` (or ``" "`` after punctuation), so
that removing a heading does not glue two lists into one. A first line of at most ``title_max_words`` words that is
followed by more text is the job title and is always kept. An ad whose every sentence is boilerplate gives ``""``.

In a run-on sentence longer than ``long_sentence_words`` (one-line scraped ads often have no full stops), a drop
pattern only drops the tail from the capitalised word that starts the matching phrase, keeping the duties before it.
Employment terms (contract type, hours, salary) are kept; employer names in field values are dropped.

Perks (``Oferujemy``, ``Vi tilbyder``; the ``perks`` groups in the YAML) are dropped: they are a third of the
cleaned text (820 vs 1,095 characters per pl-jobads ad) and the same generic list in every occupation; on
da-kompetencer 4 of 919 gold skill spans sit in "Vi tilbyder" sentences. What the whole rules cleaning does to
accuracy is measured with CV on the dev pool (``experiments/clean_effect.py``, docs/results.md#cleaning).

:meth:`RulesCleaner.explain` shows which heading or pattern decided each piece of an ad.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jobembed.clean.pii import (
    PATTERNS_DIR,
    PII_KINDS,
    combine,
    dispatch,
    kind_patterns,
    pattern_list,
    read_pattern_file,
    split_alternatives,
)
from jobembed.errors import ConfigError

LANGUAGES: tuple[str, ...] = ("da", "pl", "en")
FORMAT_VERSION = 1  # bump when the algorithm changes what the same patterns produce: it is part of the fingerprint

_SETTINGS = {"title_max_words": 15, "max_field_words": 12, "min_words_after_pii": 3, "long_sentence_words": 30}
_COMMON_KEYS = {
    "version",
    "settings",
    "triggers",
    "pii",
    "remove",
    "contact_label",
    "abbreviations",
    "drop_sentence",
    "headings",
}
_LANG_KEYS = _COMMON_KEYS - {"version", "pii"}
_HEADING_KEYS = {"keep", "drop_section", "drop_field"}

_UPPER = "A-ZĄĆĘŁŃÓŚŹŻÆØÅÄÖÜÉ"
_LOWER = "a-ząćęłńóśźżæøåäöüé"
# Scraped ads carry characters as literal "<U+202F>" / "<U0430>" text; decoding them keeps words such as
# "wa<U+0328>ski" whole and stops them looking like placeholders.
_ESCAPE = re.compile(r"<U\+?((?:[0-9A-F] ?){2,8})>")
_SENTENCE_END = re.compile(rf"[.!?…]+[\"”'»)\]]*(?=\s|$)|;|[.!?](?=[{_UPPER}][{_LOWER}])")
_NEXT_CHAR = re.compile(r"\s*(\S?)")
_NEWLINE = re.compile(r"\n")
_COLON = re.compile(r"[ \t]*[:?]")
_ESCAPED = re.compile(r"\\.")
_OPTIONAL_GROUP = re.compile(r"\(\?:[^()]*\)[?*]|\\?.\?")
_SOFT_BOUNDARY = re.compile(rf"[{_LOWER}\d,;)\]] +((?:[•*▪-] *)?[{_UPPER}])")
_BULLETS = '•·▪*-–"„“<('
_LAST_TOKEN = re.compile(r"([\w.]+)$")
_WORD = re.compile(r"[^\W\d_]{2,}")
_SPACES = re.compile(r"\s+")
_TIDY = (
    (re.compile(r" ([,.;:!?)\]])(?=\s|$)"), r"\1"),  # "Aarhus ." -> "Aarhus." but ".NET" stays
    (re.compile(r"([(\[]) "), r"\1"),
    (re.compile(r"\(\s*\)|\[\s*\]"), ""),
    (re.compile(r"([,;:])(?:\s*[,;:])+"), r"\1"),
    (re.compile(r"([.!?])(?:\s*[,;:])+(?=\s|$)"), r"\1"),
    (re.compile(r" {2,}"), " "),
)
_EDGE_JUNK = " ,;:-–—|"


class RulesCleaner:
    """Regex cleaner for one language (see the module docstring for what it removes and keeps).

    Args:
        language: one of ``LANGUAGES``; selects ``<language>.yaml`` next to ``common.yaml``.
        patterns_dir: folder with ``common.yaml`` and ``<language>.yaml``; default the package's ``patterns/``.

    Raises:
        ConfigError: unknown language, or a missing or malformed pattern file (named in the message).
    """

    def __init__(self, *, language: str = "da", patterns_dir: Path | None = None) -> None:
        if language not in LANGUAGES:
            raise ConfigError(
                "unknown cleaning language",
                expected=f"one of {', '.join(LANGUAGES)}",
                found=repr(language),
                fix=f"use one of {', '.join(LANGUAGES)} (or add patterns/{language}.yaml and LANGUAGES)",
            )
        self.language = language
        folder = Path(patterns_dir) if patterns_dir is not None else PATTERNS_DIR
        files = [folder / "common.yaml", folder / f"{language}.yaml"]
        common, lang = (read_pattern_file(p) for p in files)
        _check_keys(common, _COMMON_KEYS, files[0])
        _check_keys(lang, _LANG_KEYS, files[1])
        digest = hashlib.sha256(f"jobembed-rules-v{FORMAT_VERSION}".encode())
        for p in files:
            digest.update(b"\0" + p.name.encode() + b"\0" + p.read_bytes())
        self._fingerprint = digest.hexdigest()[:16]
        self._settings = _settings(common, lang, files)
        self._long = self._settings["long_sentence_words"]
        self._compile_removal(common, lang, files)
        self._compile_drop(common, lang, files)
        self._compile_headings(common, lang, files)
        abbreviations = [*(common.get("abbreviations") or []), *(lang.get("abbreviations") or [])]
        self._abbreviations = frozenset(str(a).lower().rstrip(".") for a in abbreviations)

    @property
    def fingerprint(self) -> str:
        """16 hex characters of sha256 over the format version and both pattern files' bytes (for cache keys)."""
        return self._fingerprint

    def clean(self, text: str) -> str:
        """Clean one ad; ``""`` when nothing but boilerplate is left (never ``None``)."""
        paragraphs: list[list[tuple[int, int, str]]] = [[]]
        for a, b, new_line, decision, piece in self._decide(text)[1]:
            if new_line and paragraphs[-1]:
                paragraphs.append([])
            if decision in ("keep", "title", "heading phrase"):
                paragraphs[-1].append((a, b, piece))
        lines = (_join(p) for p in paragraphs)
        return "\n".join(line for line in lines if line)

    def explain(self, text: str) -> list[tuple[str, str]]:
        """Why each piece of ``text`` was kept or dropped, for writing patterns.

        Returns:
            ``[(piece, decision), ...]`` in text order; ``decision`` is ``"title"``, ``"keep"``, ``"heading phrase"``
            (kept), ``"heading <kind>"``, ``"field value"``, ``"<group> section"``, ``"sentence <pattern>"`` or
            ``"contact line"`` (dropped). Pieces are the normalised text before inline removal.
        """
        norm, pieces = self._decide(text, explain=True)
        return [(norm[a:b].strip(), decision) for a, b, _, decision, _ in pieces if norm[a:b].strip()]

    def _decide(self, text: str, explain: bool = False) -> tuple[str, list[tuple[int, int, bool, str, str]]]:
        """The normalised text and ``(start, end, starts_a_line, decision, piece after inline removal)`` for
        every piece of it."""
        text = _normalise(text or "")
        if not text.strip():
            return text, []
        lower = text.lower()
        if len(lower) != len(text):  # a few characters lowercase to two ("İ"): keep offsets aligned
            lower = "".join(c if len(c.lower()) != 1 else c.lower() for c in text)
        removals = self._removal_spans(text)
        starts = [a for a, _ in removals]

        def inside(pos: int) -> bool:
            i = bisect.bisect_right(starts, pos) - 1
            return i >= 0 and removals[i][0] < pos < removals[i][1]

        headings = {a: h for a, h in self._headings(text, lower, 0).items() if not inside(a)}
        title_end = 0 if 0 in headings and headings[0][2] else self._title_end(text)  # "Vi tilbyder:" is no title
        headings = {a: h for a, h in headings.items() if a >= title_end}
        cuts = {0, len(text), title_end} | {m.end() for m in _NEWLINE.finditer(text)}
        cuts |= {p for p in self._sentence_cuts(text) if not inside(p)}
        for a, (b, _, _) in headings.items():
            cuts = {c for c in cuts if not a < c < b} | {a, b}
        hits = [m.span() for m in self._drop_any.finditer(lower)] if self._drop_any else []
        hit_starts = [h[0] for h in hits]

        def drop_pattern(a: int, b: int) -> tuple[int, str] | None:
            """Where the first drop pattern in text[a:b] matches, and (when explaining) which one."""
            m = self._drop_start.match(lower, a, b) if self._drop_start is not None else None
            if m:
                return a, "^" + _which(self._drop_start_patterns, m.group(), explain)
            i = bisect.bisect_left(hit_starts, a)
            while i < len(hits) and hits[i][0] < b:
                if hits[i][1] <= b:
                    return hits[i][0], _which(self._drop_any_patterns, lower[hits[i][0] : hits[i][1]], explain)
                i += 1
            return None

        if title_end == len(text) and "\n" not in text:
            hit = drop_pattern(0, len(text))
            if hit is not None and not text[: hit[0]].strip():  # "Prześlij CV.": boilerplate, not a job title
                title_end = 0

        out: list[tuple[int, int, bool, str, str]] = []
        mode, field_pending = "keep", False
        for a, b in itertools.pairwise(sorted(cuts)):
            new_line = a > 0 and text[a - 1] == "\n"
            if a in headings and headings[a][0] == b:
                _, kind, is_label = headings[a]
                if kind == "field":
                    field_pending = True
                else:
                    mode, field_pending = kind, False
                # "Nasze wymagania Znasz ...": a keep heading that is not a label is part of the sentence
                phrase = kind == "keep" and not is_label
                out.append((a, b, new_line, "heading phrase" if phrase else f"heading {kind}", text[a:b]))
                continue
            segment = text[a:b]
            if not segment.strip():
                continue
            if a < title_end:
                out.append((a, b, new_line, "title", _strip(text, a, b, removals, starts)))
                continue
            if field_pending:
                field_pending = False
                if len(segment.split()) <= self._settings["max_field_words"]:
                    out.append((a, b, new_line, "field value", segment))
                    continue
            if mode != "keep":
                out.append((a, b, new_line, f"{mode} section", segment))
                continue
            hit = drop_pattern(a, b)
            if hit is not None:
                # A run-on "sentence" of a one-line scraped ad can hold a whole list of duties before its "Prosimy o
                # przesłanie CV": drop from the capitalised word that starts the boilerplate phrase.
                cut = self._soft_start(text, a, hit[0]) if len(segment.split()) > self._long else a
                if cut == a:
                    out.append((a, b, new_line, f"sentence {hit[1]}", segment))
                    continue
                tail = (cut, b, False, f"sentence tail {hit[1]}", text[cut:b])
                b, segment = cut, text[a:cut]
            piece = _strip(text, a, b, removals, starts)
            few_words = len(_WORD.findall(piece)) < self._settings["min_words_after_pii"]
            out.append((a, b, new_line, "contact line" if piece != segment and few_words else "keep", piece))
            if hit is not None:
                out.append(tail)
        return text, out

    def clean_many(self, texts: Sequence[str]) -> list[str]:
        """``clean`` over many texts, in order (``None`` entries give ``""``)."""
        return [self.clean(t) if isinstance(t, str) else "" for t in texts]

    # --- compiling ----------------------------------------------------------------------------------------

    def _compile_removal(self, common: dict[str, Any], lang: dict[str, Any], files: list[Path]) -> None:
        triggers = {**_mapping(common, "triggers", files[0]), **_mapping(lang, "triggers", files[1])}
        pii = _mapping(common, "pii", files[0])
        where = f"{files[0]}: pii"
        self._pii = [kind_patterns(k, pii.get(k) or [], triggers.get(k), where=f"{where}.{k}") for k in PII_KINDS]
        remove = _merged_groups(common, lang, "remove", files)
        self._remove = [kind_patterns(g, ps, triggers.get(g), where=f"remove.{g}") for g, ps in remove.items()]
        labels = _merged_list(common, lang, "contact_label", files)
        self._label = re.compile(f"(?:{'|'.join(labels)})\\Z") if labels else None

    def _compile_drop(self, common: dict[str, Any], lang: dict[str, Any], files: list[Path]) -> None:
        groups = _merged_groups(common, lang, "drop_sentence", files).values()
        patterns = [alt for g in groups for p in g for alt in split_alternatives(p)]
        _check_lowercase(patterns, "drop_sentence", files)
        # "^..." means "at the start of the sentence": matched at each sentence start; the rest are searched once
        # over the whole lowercased text, each on its own (see KindPatterns for why not one alternation).
        self._drop_start_patterns = [p[1:] for p in patterns if p.startswith("^")]
        self._drop_start = combine(self._drop_start_patterns)
        self._drop_any_patterns = [p for p in patterns if not p.startswith("^")]
        self._drop_any = re.compile(dispatch(self._drop_any_patterns)) if self._drop_any_patterns else None

    def _compile_headings(self, common: dict[str, Any], lang: dict[str, Any], files: list[Path]) -> None:
        alts: list[tuple[str, str]] = []
        for data, path in ((common, files[0]), (lang, files[1])):
            h = _mapping(data, "headings", path)
            if set(h) - _HEADING_KEYS:
                raise ConfigError(
                    "bad `headings:`", where=str(path), expected=f"keys {', '.join(sorted(_HEADING_KEYS))}"
                )
            alts += [(p, "keep") for p in pattern_list(h.get("keep"), where=f"{path}: headings.keep")]
            for group, pats in _mapping(h, "drop_section", path).items():
                where = f"{path}: headings.drop_section.{group}"
                alts += [(p, str(group)) for p in pattern_list(pats, where=where)]
            alts += [(p, "field") for p in pattern_list(h.get("drop_field"), where=f"{path}: headings.drop_field")]
        _check_lowercase([p for p, _ in alts], "headings", files)
        # Longer phrases first, so "wymagane dokumenty" (contact) wins over "wymagane( umiejętności)?" (keep) at the
        # same position. No capturing groups to tell the kinds apart: they make this alternation ~20x slower;
        # _heading_kind asks instead.
        alts.sort(key=lambda pk: -_required_length(pk[0]))
        self._heading_alts = [(re.compile(p), kind) for p, kind in alts]
        self._heading_kind_cache: dict[str, str] = {}
        body = dispatch([p for p, _ in alts])
        self._heading = re.compile(rf"(?<![\w-])(?:{body})(?!\w)") if alts else None

    def _heading_kind(self, phrase: str) -> str:
        """The kind of the first (longest) heading pattern that matches the whole phrase, as the alternation did."""
        kind = self._heading_kind_cache.get(phrase)
        if kind is None:
            kind = next((k for rx, k in self._heading_alts if rx.fullmatch(phrase)), "keep")
            self._heading_kind_cache[phrase] = kind
        return kind

    # --- cleaning steps -----------------------------------------------------------------------------------

    def _removal_spans(self, text: str) -> list[tuple[int, int]]:
        """Merged spans to cut out: pii (with a contact word in front) and the ``remove:`` groups."""
        spans = []
        for kp in self._pii:
            for a, b in kp.spans(text):
                m = self._label.search(text, max(0, a - 40), a) if self._label else None
                spans.append((m.start() if m else a, b))
        spans += [s for kp in self._remove for s in kp.spans(text)]
        spans.sort()
        merged: list[tuple[int, int]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
            else:
                merged.append((a, b))
        return merged

    def _headings(self, text: str, lower: str, start: int) -> dict[int, tuple[int, str, bool]]:
        """``{start: (end, kind, is_label)}`` of the heading phrases in ``text``.

        A heading starts with a capital letter and is a label (followed by ``:`` or ``?``, or alone on its line) or
        runs into the next sentence: a capitalised word, or for headings of two or more words any word
        ("Twój zakres obowiązków projektowanie ..." on pracuj.pl). Fields must be labels.
        """
        out: dict[int, tuple[int, str, bool]] = {}
        if self._heading is None:
            return out
        for m in self._heading.finditer(lower, start):
            a, end = m.span()
            if not text[a].isupper():
                continue
            kind = self._heading_kind(m.group())
            colon = _COLON.match(text, end)
            if colon:
                out[a] = (colon.end(), kind, True)
                continue
            gap = _NEXT_CHAR.match(text, end)
            nxt = gap.group(1)
            at_line_end = nxt == "" or "\n" in gap.group(0)
            runs_on = nxt.isupper() or nxt.isdigit() or nxt in _BULLETS or (" " in m.group() and nxt.isalpha())
            if kind != "field" and (at_line_end or runs_on):
                out[a] = (end, kind, at_line_end)
        return out

    @staticmethod
    def _soft_start(text: str, a: int, hit: int) -> int:
        """Start of the capitalised word (after a non-capitalised one) at or before ``hit``; ``a`` if none."""
        starts = [m.start(1) for m in _SOFT_BOUNDARY.finditer(text, a, hit + 1)]
        return starts[-1] if starts else a

    def _title_end(self, text: str) -> int:
        newline = text.find("\n")
        if newline < 0 or not text[newline:].strip():
            # One short line is a job title typed on its own ("Magazynier tel. 600 100 200", "Pracownik produkcji -
            # atrakcyjne wynagrodzenie"): kept as a title (contact data still cut out), never dropped as a contact
            # line or a perk sentence, which left nothing to classify. Several sentences or a long one-line scrape
            # are cleaned as text.
            short = len(text.split()) <= self._settings["title_max_words"]
            one_sentence = not any(c < len(text.rstrip()) for c in self._sentence_cuts(text))
            return len(text) if short and one_sentence else 0
        return newline + 1 if len(text[:newline].split()) <= self._settings["title_max_words"] else 0

    def _sentence_cuts(self, text: str) -> list[int]:
        cuts = []
        for m in _SENTENCE_END.finditer(text):
            end, mark = m.end(), m.group()
            if mark != ";" and mark[0] == "." and not mark.startswith("..."):
                token = _LAST_TOKEN.search(text, max(0, m.start() - 20), m.start())
                word = token.group(1).lower() if token else ""
                if len(word) <= 1 or word in self._abbreviations:
                    continue
            if mark != ";":
                nxt = _NEXT_CHAR.match(text, end).group(1)
                if nxt and not (nxt.isupper() or nxt.isdigit() or nxt in _BULLETS):
                    continue
            cuts.append(end)
        return cuts


def _strip(text: str, a: int, b: int, removals: list[tuple[int, int]], starts: list[int]) -> str:
    """text[a:b] with the removal spans that start inside it replaced by a space."""
    i = bisect.bisect_left(starts, a)
    parts, pos = [], a
    while i < len(removals) and removals[i][0] < b:
        s, e = removals[i]
        parts += [text[pos:s], " "]
        pos = max(pos, min(e, b))
        i += 1
    parts.append(text[pos:b])
    return "".join(parts)


def _which(patterns: list[str], matched: str, explain: bool) -> str:
    """The first pattern that matches the whole of ``matched`` (only worked out when explaining: it costs)."""
    if not explain:
        return "(pattern)"
    return next((p for p in patterns if re.fullmatch(p, matched)), "(pattern)")


def _required_length(pattern: str) -> int:
    """Length of a heading pattern without its optional groups: a proxy for the shortest phrase it matches."""
    previous = None
    while previous != pattern:
        previous, pattern = pattern, _OPTIONAL_GROUP.sub("", pattern)
    return len(pattern)


def _normalise(text: str) -> str:
    text = _ESCAPE.sub(_decode_escape, text.replace("\r\n", "\n").replace("\r", "\n"))
    return unicodedata.normalize("NFC", text)


def _decode_escape(m: re.Match[str]) -> str:
    char = chr(int(m.group(1).replace(" ", ""), 16))
    category = unicodedata.category(char)
    return " " if category.startswith(("Z", "C")) else char


def _join(pieces: list[tuple[int, int, str]]) -> str:
    """One line from its kept pieces: verbatim where they touched in the original, '. ' over a removed gap."""
    out = ""
    prev_end = -1
    for a, b, piece in pieces:
        if not out or a == prev_end:
            out += piece
        else:
            left = out.rstrip()
            sep = " " if left.endswith((".", "!", "?", ";", ":", ",")) else ". "
            out = left + sep + piece.lstrip()
        prev_end = b
    out = _SPACES.sub(" ", out)
    for rx, repl in _TIDY:
        out = rx.sub(repl, out)
    return out.strip(_EDGE_JUNK)


def _settings(common: dict[str, Any], lang: dict[str, Any], files: list[Path]) -> dict[str, int]:
    settings = dict(_SETTINGS)
    for data, path in zip((common, lang), files, strict=True):
        for key, value in _mapping(data, "settings", path).items():
            if key not in _SETTINGS or not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(
                    f"bad setting {key}: {value!r}",
                    where=str(path),
                    expected=f"non-negative integers for {', '.join(_SETTINGS)}",
                    fix="fix or remove the setting",
                )
            settings[key] = value
    return settings


def _mapping(data: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"`{key}:` must be a mapping", where=str(path), found=type(value).__name__)
    return value


def _check_lowercase(patterns: list[str], key: str, files: list[Path]) -> None:
    """Headings and sentence patterns run on the lowercased text, so an uppercase letter could never match."""
    for p in patterns:
        if any(c.isupper() for c in _ESCAPED.sub("", p)):
            raise ConfigError(
                f"`{key}` pattern {p!r} has uppercase letters",
                where=f"{files[0].parent}/{{common,{files[1].name}}}",
                fix="write it in lowercase: it is matched against the lowercased text",
            )


def _check_keys(data: dict[str, Any], allowed: set[str], path: Path) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown keys {unknown}", where=str(path), expected=", ".join(sorted(allowed)), fix="remove or rename them"
        )


def _merged_list(common: dict[str, Any], lang: dict[str, Any], key: str, files: list[Path]) -> list[str]:
    out: list[str] = []
    for data, path in zip((common, lang), files, strict=True):
        out += pattern_list(data.get(key), where=f"{path}: {key}")
    return out


def _merged_groups(common: dict[str, Any], lang: dict[str, Any], key: str, files: list[Path]) -> dict[str, list[str]]:
    """``{group: patterns}`` of common + language, lists of the same group concatenated."""
    out: dict[str, list[str]] = {}
    for data, path in zip((common, lang), files, strict=True):
        for group, pats in _mapping(data, key, path).items():
            out.setdefault(str(group), []).extend(pattern_list(pats, where=f"{path}: {key}.{group}"))
    return out
