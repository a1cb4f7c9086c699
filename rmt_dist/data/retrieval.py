"""The 1M-token paper's retrieval tasks (PAPERS.md section 2): facts hidden in long distractor text, a
question at the end, for measuring retrieval against input length.

Facts are bAbI-style sentences, the distractor is sentences of the smoke corpus (Python's documentation
prose, lower-cased, letters and full stops only) and the answer is a location:

- ``start``: ``mary went to the kitchen.`` opens the text; ``where is mary?`` -> ``kitchen`` (bAbI qa1);
- ``random``: the same fact at a random sentence boundary of the distractor;
- ``two``: ``sandra went to the garden.`` then, later, ``sandra picked up the milk.``, each at a random
  boundary; ``where is the milk?`` -> ``garden``: the answer needs both facts (bAbI qa2).

The text (facts, distractor, question) is exactly ``length`` characters: the distractor fills what the
facts and the question leave, so the same task grows with the segment count (the curriculum).
"""

from __future__ import annotations

import re
import string
from functools import lru_cache

import numpy as np

from rmt_dist.data.errors import DataError

CHARS = string.ascii_lowercase + " .?"
NAMES = ("mary", "john", "sandra", "daniel")
PLACES = ("kitchen", "garden", "office", "hallway", "bathroom", "bedroom")
OBJECTS = ("apple", "football", "milk")
ANSWER_LEN = max(map(len, PLACES))
VARIANTS = ("start", "random", "two")


@lru_cache(maxsize=1)
def distractor_sentences() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    text = re.sub(r"[^a-z.]+", " ", " ".join(topics.values()).lower())
    sentences = (" ".join(s.split()) for s in text.split("."))
    return tuple(s + "." for s in sentences if len(s.split()) >= 4)


def _distractor(rng: np.random.Generator, n_chars: int) -> str:
    sentences = distractor_sentences()
    parts, total = [], 0
    while total < n_chars:
        parts.append(sentences[rng.integers(len(sentences))])
        total += len(parts[-1]) + 1
    return " ".join(parts)[:n_chars]


def min_length(variant: str) -> int:
    """The shortest text of a variant: its longest facts and question without distractor."""
    name, place, thing = (max(words, key=len) for words in (NAMES, PLACES, OBJECTS))
    facts = len(f"{name} went to the {place}. ") + (len(f"{name} picked up the {thing}. ") if variant == "two" else 0)
    return facts + len(f" where is the {thing}?" if variant == "two" else f" where is {name}?")


def retrieval_sample(rng: np.random.Generator, variant: str, length: int) -> tuple[str, str]:
    """(text of ``length`` characters ending in the question, the answer location)."""
    if length < min_length(variant):
        raise DataError(f"data.task_length must be >= {min_length(variant)} for data.task=retrieval_{variant} "
                        f"(the facts and the question), got {length}")
    name, place = NAMES[rng.integers(len(NAMES))], PLACES[rng.integers(len(PLACES))]
    facts = [f"{name} went to the {place}."]
    question = f" where is {name}?"
    if variant == "two":
        thing = OBJECTS[rng.integers(len(OBJECTS))]
        facts.append(f"{name} picked up the {thing}.")
        question = f" where is the {thing}?"
    budget = max(0, length - len(question) - sum(len(f) + 1 for f in facts))
    distractor = _distractor(rng, budget)
    boundaries = [0] + [m.end() for m in re.finditer(r"\. ", distractor)]
    if variant == "start":
        at = [0]
    else:
        at = sorted(boundaries[i] for i in rng.integers(len(boundaries), size=len(facts)))
    pieces, last = [], 0
    for offset, fact in zip(at, facts):
        pieces += [distractor[last:offset], fact + " "]
        last = offset
    text = "".join(pieces) + distractor[last:] + question
    return text, place
