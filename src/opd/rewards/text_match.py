"""Pure string scoring for text rendering (OCR) rewards, as docs/algorithms.md (Rewards) describes.

Both the target and the recognised text are normalised the same way (lower-cased, every whitespace
character removed) before comparison, so ``"Hello World"`` and ``"helloworld"`` are equal.
"""

from __future__ import annotations

import re

_QUOTED = re.compile(r'"([^"]*)"')
_SPACE = re.compile(r"\s+")


def quoted_text(prompt: str) -> str | None:
    """Text inside the first pair of double quotes of ``prompt``, or ``None`` if there is none.

    >>> quoted_text('a sign that says "OPEN 24H" on a wall')
    'OPEN 24H'
    >>> quoted_text('a "first" and a "second"')
    'first'
    >>> quoted_text('no quotes here') is None
    True
    """
    match = _QUOTED.search(prompt)
    return None if match is None else match.group(1)


def normalise(text: str) -> str:
    """Lower-case and drop all whitespace (the references' normalisation).

    >>> normalise(" Hello  World\\n")
    'helloworld'
    """
    return _SPACE.sub("", text.lower())


def levenshtein(a: str, b: str) -> int:
    """Edit distance (unit-cost insertions, deletions, substitutions) between ``a`` and ``b``.

    >>> levenshtein("kitten", "sitting")
    3
    >>> levenshtein("", "abc"), levenshtein("abc", "abc")
    (3, 0)
    """
    if len(a) < len(b):
        a, b = b, a  # keep the row over the shorter string: O(min(len)) memory
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def ocr_accuracy(target: str, recognised: str) -> float:
    """Edit-distance accuracy in [0, 1] of ``recognised`` against ``target`` (Flow-GRPO's OCR reward).

    After normalisation, the distance is 0 if the target is a substring of the recognised text
    (extra text read around the sign is not penalised), else the Levenshtein distance capped at
    ``len(target)``; the accuracy is ``1 - dist / len(target)``. An empty target scores 0 (the
    references divide by its length; there is nothing to reward).

    >>> ocr_accuracy("Hello World", "helo world")
    0.9
    >>> ocr_accuracy("ABC", "xx abc yy"), ocr_accuracy("ABC", ""), ocr_accuracy("ABC", "abd")
    (1.0, 0.0, 0.6666666666666667)
    """
    target_n, recognised_n = normalise(target), normalise(recognised)
    if not target_n:
        return 0.0
    if target_n in recognised_n:
        return 1.0
    dist = min(levenshtein(target_n, recognised_n), len(target_n))
    return 1.0 - dist / len(target_n)


def exact_match(target: str, recognised: str) -> bool:
    """Whether the recognised text equals the target after normalisation.

    >>> exact_match("Hello World", "HELLOWORLD"), exact_match("ABC", "ABCD")
    (True, False)
    """
    return normalise(target) == normalise(recognised)
