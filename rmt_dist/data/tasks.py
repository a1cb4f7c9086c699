"""The paper's algorithmic tasks as (source, target) string generators over small character vocabularies.

Every task's vocabulary is ``_`` (pad, id 0), ``|`` (start of target, id 1), then its own characters.
A sample is ``source | target``; the model reads it left to right and is scored on the target only.

- copy: random letters; target = the source twice.  reverse: target = the source reversed.
- assoc (Ba et al. 2016): ``n`` key-value pairs (distinct letter keys a-zA-Z, digit values), ``??`` and one
  of the keys; target = its value.  ``c9k8j3f1??c`` -> ``9``.
- quadratic: the exact format of the paper (PAPERS.md section 1); every step padded to 30 characters:
  source = the equation; target = [normalized equation, discriminant, root, root, answer]. Every 5th
  sample of a split (20%) has no real roots: its root steps are blank and the answer is ``none``.
- sort (∞-former): ``n`` tokens over 20 symbols drawn from a mixture of two random distributions whose
  weight moves linearly from the first to the second along the sequence (our reading of the paper);
  target = all 20 symbols by descending count in the sequence, ties by symbol order.
- retrieval_start, retrieval_random, retrieval_two (1M-token paper): see ``retrieval.py``; ``task_length``
  is the text's length in characters, the target the answer location.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np

from rmt_dist.data import retrieval

PAD, SOT = "_", "|"
STEP = 30  # quadratic: characters per step
SORT_SYMBOLS = string.ascii_lowercase[:20]


@dataclass(frozen=True)
class CharVocab:
    chars: str  # the task's characters, after PAD and SOT

    @property
    def symbols(self) -> str:
        return PAD + SOT + self.chars

    @property
    def size(self) -> int:
        return len(self.symbols)

    @cached_property
    def _table(self) -> np.ndarray:
        table = np.zeros(128, np.int8)
        table[np.frombuffer(self.symbols.encode("ascii"), np.uint8)] = np.arange(self.size)
        return table

    def encode(self, text: str) -> np.ndarray:
        return self._table[np.frombuffer(text.encode("ascii"), np.uint8)]

    def decode(self, ids: np.ndarray) -> str:
        return "".join(self.symbols[i] for i in ids)


@dataclass(frozen=True)
class Task:
    name: str
    vocab: CharVocab
    sample: Callable[[np.random.Generator, int, int], tuple[str, str]]  # (rng, task_length, index) -> texts
    distinct: Callable[[int], int]  # how many different sources exist for a task_length
    paper_sizes: tuple[int, int, int]  # train, valid, test
    max_length: int | None = None  # largest task_length the task supports


def _letters(rng: np.random.Generator, alphabet: str, n: int) -> str:
    return "".join(alphabet[i] for i in rng.integers(len(alphabet), size=n))


def _copy(rng: np.random.Generator, n: int, _: int) -> tuple[str, str]:
    source = _letters(rng, string.ascii_lowercase, n)
    return source, source * 2


def _reverse(rng: np.random.Generator, n: int, _: int) -> tuple[str, str]:
    source = _letters(rng, string.ascii_lowercase, n)
    return source, source[::-1]


ASSOC_KEYS = string.ascii_letters


def _assoc(rng: np.random.Generator, n: int, _: int) -> tuple[str, str]:
    keys = [ASSOC_KEYS[i] for i in rng.choice(len(ASSOC_KEYS), size=n, replace=False)]
    values = [str(v) for v in rng.integers(10, size=n)]
    query = int(rng.integers(n))
    return "".join(k + v for k, v in zip(keys, values)) + "??" + keys[query], values[query]


def _poly(a: int, b: int, c: int) -> str:
    """``a*x^2+b*x+c=0`` as the paper writes it: no ``1*``, zero terms left out (``a`` is never 0)."""
    terms: list[str] = []
    for coef, power in ((a, "x^2"), (b, "x"), (c, "")):
        if coef:
            body = str(abs(coef)) if not power else power if abs(coef) == 1 else f"{abs(coef)}*{power}"
            terms.append(("-" if coef < 0 else "+" if terms else "") + body)
    return "".join(terms) + "=0"


def quadratic_real(alpha: int, x1: int, x2: int) -> tuple[str, list[str], str]:
    """(equation, solution steps, answer) for alpha*(x - x1)(x - x2) = 0 with x1 <= x2."""
    b, c = -(x1 + x2), x1 * x2
    d = b * b - 4 * c
    s = math.isqrt(d)
    c_text = f"({c})" if c < 0 else str(c)
    steps = [_poly(1, b, c), f"D={abs(b)}^2-4*1*{c_text}={d}={s}^2",
             f"x=({-b}-{s})/2={x1}", f"x=({-b}+{s})/2={x2}"]
    return _poly(alpha, alpha * b, alpha * c), steps, f"{x1},{x2}"


def quadratic_none(alpha: int, b: int, c: int) -> tuple[str, list[str], str]:
    """(equation, steps, answer) for alpha*(x^2 + b*x + c) = 0 with b^2 - 4c < 0."""
    d = b * b - 4 * c
    return _poly(alpha, alpha * b, alpha * c), [_poly(1, b, c), f"D={abs(b)}^2-4*1*{c}={d}<0", "", ""], "none"


ALPHAS = [a for a in range(-10, 11) if a]  # the multiplier of the equation: 1..10 and its negatives


def _quadratic(rng: np.random.Generator, _: int, index: int) -> tuple[str, str]:
    alpha = ALPHAS[rng.integers(len(ALPHAS))]
    if index % 5 == 4:  # 20% without real roots
        b = int(rng.integers(-200, 201))
        c = int(rng.integers(b * b // 4 + 1, b * b // 4 + 10_001))
        equation, steps, answer = quadratic_none(alpha, b, c)
    else:
        x1, x2 = sorted(int(x) for x in rng.integers(-100, 101, size=2))
        equation, steps, answer = quadratic_real(alpha, x1, x2)
    return equation.ljust(STEP, PAD), "".join(step.ljust(STEP, PAD) for step in (*steps, answer))


def sort_target(source: str) -> str:
    counts = np.bincount(np.frombuffer(source.encode(), np.uint8) - ord("a"), minlength=len(SORT_SYMBOLS))
    return "".join(SORT_SYMBOLS[i] for i in np.lexsort((np.arange(len(counts)), -counts)))


def _sort(rng: np.random.Generator, n: int, _: int) -> tuple[str, str]:
    k = len(SORT_SYMBOLS)
    first, second = rng.dirichlet(np.ones(k), size=2)
    weight = np.linspace(0.0, 1.0, n)  # probability of drawing from the second distribution
    from_second = rng.random(n) < weight
    u = rng.random(n)
    ids = np.where(from_second, np.searchsorted(np.cumsum(second), u * second.sum()),
                   np.searchsorted(np.cumsum(first), u * first.sum()))
    source = np.frombuffer(SORT_SYMBOLS.encode(), np.uint8)[np.minimum(ids, k - 1)].tobytes().decode()
    return source, sort_target(source)


def _retrieval(variant: str) -> Callable[[np.random.Generator, int, int], tuple[str, str]]:
    """The answer padded to the longest location, so every sample of a length has one size."""
    def sample(rng: np.random.Generator, n: int, _: int) -> tuple[str, str]:
        text, answer = retrieval.retrieval_sample(rng, variant, n)
        return text, answer.ljust(retrieval.ANSWER_LEN, PAD)

    return sample


_QUADRATIC_REAL = len(ALPHAS) * (201 * 202 // 2)  # alphas x unordered root pairs
PAPER = (100_000, 5_000, 10_000)
TASKS: dict[str, Task] = {
    "copy": Task("copy", CharVocab(string.ascii_lowercase), _copy, lambda n: 26 ** n, PAPER),
    "reverse": Task("reverse", CharVocab(string.ascii_lowercase), _reverse, lambda n: 26 ** n, PAPER),
    "assoc": Task("assoc", CharVocab(ASSOC_KEYS + string.digits + "?"), _assoc,
                  lambda n: math.perm(len(ASSOC_KEYS), n) * 10 ** n * n, PAPER, max_length=len(ASSOC_KEYS)),
    # real-root equations are 80% of the samples and the scarcer kind
    "quadratic": Task("quadratic", CharVocab(string.digits + "x^*+-=()/D,<noe"), _quadratic,
                      lambda n: _QUADRATIC_REAL * 5 // 4, (100_000, 10_000, 20_000)),
    # PAPERS.md gives no sizes for sort; 16k-token samples make 100,000 of them impractical (our choice)
    "sort": Task("sort", CharVocab(SORT_SYMBOLS), _sort, lambda n: len(SORT_SYMBOLS) ** n,
                 (10_000, 1_000, 1_000)),
    # The 1M-token paper gives no sizes either; its texts are long, so the sort sizes (our choice).
    **{f"retrieval_{variant}": Task(f"retrieval_{variant}", CharVocab(retrieval.CHARS), _retrieval(variant),
                                    lambda n: 10 ** 12, (10_000, 1_000, 1_000))
       for variant in retrieval.VARIANTS},
}
