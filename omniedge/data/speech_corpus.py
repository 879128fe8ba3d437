"""What speech synthesised during training says: sentences and clauses of the training documents, a word
list for the words-to-sentences curriculum, and the held-out texts that training must never speak.

The dataset's own speech split keeps 6,000 training utterances of 3-10 words from a 2,000-word
vocabulary. Training on the GPU machine synthesises its speech there (omniedge.data.speech_stream), so it
can speak every sentence and comma clause of the training documents whose words are among the
`vocab_size` most frequent training words (about 70,000 distinct texts at 4,000 words). The held-out set
is every sentence and clause of the validation and test documents, every validation and test utterance of
the dataset and PROBE_SENTENCES (the shipped model's behaviour test); a training text equal to any of them
(as normalised words) is dropped. The lists travel in the training pack as xz-compressed text, one per line.
"""

from __future__ import annotations

import lzma
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from omniedge.data.text_corpus import normalise_sentence, words_of

TRAIN_VOCAB = 4000
MIN_WORDS, MAX_WORDS = 3, 12
# Utterances of the full dataset's test split (seed 0, held-out voices in the test): the shipped model's
# behaviour test speaks them, so training never does, whatever dataset the pack came from.
PROBE_SENTENCES = (
    "peace be with you",
    "give me a cup of wine",
    "we could never meet",
    "give her this letter",
    "you will keep the house",
    "travel through the air",
)
# Sentence ends and clause breaks: the speech split's boundaries plus commas and dashes.
_CLAUSE = re.compile(r"(?<=[.!?;:,])\s+|\n|\s+-{1,2}\s+")


def clauses_of(text: str) -> list[str]:
    """Normalised sentences and comma clauses of a text ('Yes, my lord.' -> ['yes', 'my lord'])."""
    out = []
    for raw in _CLAUSE.split(text):
        s = normalise_sentence(raw)
        if s:
            out.append(s)
    return out


def ranked_words(texts: Iterable[str]) -> list[str]:
    """Words by falling frequency (ties alphabetical, so deterministic)."""
    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(words_of(t))
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def held_out_texts(held_out_documents: Iterable[str], held_out_utterances: Iterable[str]) -> set[str]:
    """Every normalised sentence and clause of the held-out documents, the held-out utterances, the probes."""
    held = set(PROBE_SENTENCES)
    for doc in held_out_documents:
        held.update(clauses_of(doc))
    for u in held_out_utterances:
        s = normalise_sentence(u)
        if s:
            held.add(s)
    return held


def training_texts(
    documents: Iterable[str],
    held_out: set[str],
    vocab_size: int = TRAIN_VOCAB,
    min_words: int = MIN_WORDS,
    max_words: int = MAX_WORDS,
) -> tuple[list[str], list[str]]:
    """(distinct sentences and clauses to speak, the vocabulary by falling frequency) of training documents.

    A text is kept when it has `min_words`-`max_words` words, all among the `vocab_size` most frequent
    training words, and is not in `held_out`. Order: first appearance (deterministic).
    """
    docs = list(documents)
    vocab_ranked = ranked_words(docs)[:vocab_size]
    vocab = set(vocab_ranked)
    seen: set[str] = set()
    out: list[str] = []
    for doc in docs:
        for s in clauses_of(doc):
            if s in seen or s in held_out:
                continue
            w = s.split()
            if min_words <= len(w) <= max_words and all(x in vocab for x in w):
                seen.add(s)
                out.append(s)
    return out, vocab_ranked


def write_lines(path: str | Path, lines: Iterable[str]) -> None:
    """One text per line, xz-compressed."""
    Path(path).write_bytes(lzma.compress("".join(f"{x}\n" for x in lines).encode("utf-8"), preset=9))


def read_lines(path: str | Path) -> list[str]:
    return [x for x in lzma.decompress(Path(path).read_bytes()).decode("utf-8").split("\n") if x]
