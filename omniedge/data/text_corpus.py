"""The text corpus: clean raw documents, split them by document, and pick short sentences for speech.

Splits are decided per document (a hash of seed, source and document id), so no sentence of a validation
or test document is in training text; speech sentences are taken from the documents of their own split.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from omniedge.data.sources import Doc

SPLITS = ("train", "val", "test")


def unit_hash(*parts: object) -> float:
    """A stable number in [0, 1) from any parts (Python's hash() is salted per process)."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_of(u: float, val: float = 0.05, test: float = 0.05) -> str:
    return "test" if u >= 1 - test else "val" if u >= 1 - test - val else "train"


_SENT_END = re.compile(r"(?<=[.!?;:])\s+|\n")  # sentence (clause) boundaries
_SPEAKER = re.compile(r"^[A-Z][A-Za-z'. ]{0,30}\.$")
_HEADER = re.compile(r"^\s*(ACT|Act|SCENE|Scene|PERSONS|Persons|DRAMATIS)\b.*$")


def _clean_play(text: str) -> str:
    """Gutenberg play text -> speeches as paragraphs, without speaker names and stage directions."""
    text = re.sub(r"\[[^\]]*\]", " ", text)
    out: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.strip().splitlines() if ln.strip()]
        if len(lines) >= 2 and len(lines[0].split()) <= 4 and _SPEAKER.match(lines[0]):
            lines = lines[1:]
        lines = [ln for ln in lines if not _HEADER.match(ln)]
        if lines:
            out.append(" ".join(lines))
    return "\n".join(out)


def clean_text(text: str, source: str = "") -> str:
    """Strip markup and normalise whitespace: paragraphs on their own lines, single spaces inside."""
    text = unicodedata.normalize("NFKC", text)
    if source == "shakespeare":
        text = _clean_play(text)
    text = re.sub(r"<[^>]{0,200}>", " ", text)  # html-ish tags
    text = re.sub(r"[_*`|~^]+", " ", text)  # emphasis and table markup
    text = text.replace("\u2018", "'").replace("\u2019", "'").replace("\u201c", '"').replace("\u201d", '"')
    text = re.sub(r"[^\S\n]+", " ", text)
    paras = [p.strip() for p in re.split(r"\n\s*\n" if source == "fortunes" else r"\n", text)]
    return "\n".join(re.sub(r"\s+", " ", p) for p in paras if p)


@dataclass(frozen=True)
class TextDoc:
    source: str
    doc_id: str
    split: str
    text: str


def split_corpus(
    docs: Iterable[Doc], seed: int, budget: dict[str, int], min_chars: int = 20
) -> dict[str, list[TextDoc]]:
    """Clean and split documents; keep each split of each source within `budget[split]` characters."""
    pools: dict[str, list[tuple[float, Doc]]] = {s: [] for s in SPLITS}
    for d in docs:
        split = split_of(unit_hash(seed, "split", d.source, d.doc_id))
        pools[split].append((unit_hash(seed, "order", d.source, d.doc_id), d))
    out: dict[str, list[TextDoc]] = {}
    for split, pool in pools.items():
        pool.sort(key=lambda t: t[0])
        kept, used = [], 0
        for _, d in pool:  # clean lazily: a small build reads only what it keeps
            if used >= budget[split]:
                break
            text = clean_text(d.text, d.source)
            if len(text) >= min_chars:
                kept.append(TextDoc(d.source, d.doc_id, split, text))
                used += len(text)
        out[split] = sorted(kept, key=lambda t: (t.source, t.doc_id))
    return out


def sentence_key(sentence: str) -> str:
    """What makes two sentences the same: their lower-cased words and numbers."""
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)*", sentence.lower()))


def sentences_of(text: str) -> list[str]:
    return [s for s in _SENT_END.split(text) if s.strip()]


def dedupe_sentences(by_split: dict[str, list[TextDoc]]) -> dict[str, list[TextDoc]]:
    """Drop from val (test) every sentence that train (train or val) already has, so splits share none."""
    seen: set[str] = set()
    out: dict[str, list[TextDoc]] = {}
    for split in SPLITS:
        docs = []
        for d in by_split[split]:
            if split == "train":
                docs.append(d)
                continue
            paras = []
            for para in d.text.split("\n"):
                kept = [s for s in sentences_of(para) if sentence_key(s) not in seen]
                if kept:
                    paras.append(" ".join(kept))
            if paras:
                docs.append(TextDoc(d.source, d.doc_id, d.split, "\n".join(paras)))
        for d in docs:
            seen.update(k for k in map(sentence_key, sentences_of(d.text)) if k)
        out[split] = docs
    return out


_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


def words_of(text: str) -> list[str]:
    """Lower-cased words as espeak-ng reads them: letters and inner apostrophes; hyphens split words."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def vocabulary(docs: Iterable[TextDoc], size: int) -> set[str]:
    """The `size` most frequent words (ties broken alphabetically, so it is deterministic)."""
    counts: Counter[str] = Counter()
    for d in docs:
        counts.update(words_of(d.text))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return {w for w, _ in ranked[:size]}


def normalise_sentence(sentence: str) -> str | None:
    """'The Sun, at 9 am!' -> None (digits are read unpredictably); 'Well-known facts.' -> 'well known facts'."""
    if re.search(r"\d", sentence):
        return None
    words = words_of(sentence)
    return " ".join(words) if words else None


def speech_sentences(
    docs: Iterable[TextDoc], vocab: set[str], min_words: int = 3, max_words: int = 10
) -> list[str]:
    """Short normalised sentences whose every word is in `vocab` (a tiny ASR model can learn those)."""
    seen: set[str] = set()
    out: list[str] = []
    for d in docs:
        for raw in _SENT_END.split(d.text):
            s = normalise_sentence(raw)
            if s is None or s in seen:
                continue
            w = s.split()
            if min_words <= len(w) <= max_words and all(x in vocab for x in w):
                seen.add(s)
                out.append(s)
    return out
