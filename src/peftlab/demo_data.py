"""The demo's own small labelled dataset: templated movie-review sentiment, generated deterministically.

Shipped with the package (no download, nothing from ../shared): a few hundred sentences built from
fixed word lists with a fixed seed, split into train and dev with disjoint templates' subjects.
"""

from __future__ import annotations

import random

POS = ["wonderful", "delightful", "brilliant", "moving", "charming", "superb", "gripping", "heartfelt", "funny",
       "beautiful", "clever", "touching", "excellent", "memorable", "joyful"]
NEG = ["dull", "tedious", "awful", "boring", "clumsy", "lifeless", "painful", "bland", "forgettable", "messy",
       "dreadful", "shallow", "annoying", "weak", "tiresome"]
SUBJECTS = ["the film", "this movie", "the story", "the acting", "the script", "the ending", "the soundtrack",
            "the director's latest work", "the cast", "the plot", "the dialogue", "this sequel"]
TEMPLATES = [
    "{s} was {a} from start to finish.",
    "i found {s} {a}.",
    "honestly, {s} is {a}.",
    "{s} felt {a} and i would say so again.",
    "what a {a} experience {s} turned out to be.",
    "everyone agreed that {s} was {a}.",
    "{s} is {a}, no doubt about it.",
    "my friends thought {s} was {a}.",
]
NEGATIONS = [("not {a}", "flip")]


def _make(rng: random.Random, subjects: list[str], n: int) -> list:
    from .train.tasks import Example

    out = []
    for _ in range(n):
        label = rng.randint(0, 1)
        adj = rng.choice(POS if label else NEG)
        text = rng.choice(TEMPLATES).format(s=rng.choice(subjects), a=adj)
        out.append(Example((text,), label))
    return out


def demo_examples(seed: int = 0) -> tuple[list, list]:
    """(train, dev): 400 training and 160 dev sentences; dev uses subjects unseen in training."""
    rng = random.Random(seed)
    return _make(rng, SUBJECTS[:8], 400), _make(rng, SUBJECTS[8:], 160)
