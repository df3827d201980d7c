"""SQuAD-style answer scoring: normalise, then exact match and token F1."""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD evaluation script's
    normalisation)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize(prediction) == normalize(answer))


def f1(prediction: str, answer: str) -> float:
    pred, gold = normalize(prediction).split(), normalize(answer).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if not pred or not gold:
        return float(pred == gold)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def contains(prediction: str, answer: str) -> float:
    """The answer appears in the prediction (whole words, normalised): lenient, for models that
    answer in a sentence."""
    gold = normalize(answer)
    return float(bool(gold) and f" {gold} " in f" {normalize(prediction)} ")


def starts_with(prediction: str, answer: str) -> float:
    """The prediction begins with the answer: the score for completion probes."""
    gold = normalize(answer)
    return float(bool(gold) and f"{normalize(prediction)} ".startswith(f"{gold} "))
