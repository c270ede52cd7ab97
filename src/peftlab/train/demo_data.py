"""The demo's own small labelled dataset: templated movie-review sentiment, generated deterministically.

Shipped with the package as ``peftlab/data/demo_sentiment_{train,dev}.jsonl`` (no download, nothing
from ../shared): a few hundred sentences built from fixed word lists with a fixed seed, split into
train and dev with disjoint subjects. Regenerate the files with ``python -m peftlab.train.demo_data``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).parents[1] / "data"  # the package data folder, peftlab/data
LABELS = ["negative", "positive"]

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
    from .tasks import Example

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


def shipped_files() -> dict[str, Path]:
    return {split: DATA_DIR / f"demo_sentiment_{split}.jsonl" for split in ("train", "dev")}


def write(seed: int = 0) -> dict[str, Path]:
    """Write the generated dataset as JSONL (``{"text", "label"}``, label a string) into the package."""
    files = shipped_files()
    DATA_DIR.mkdir(exist_ok=True)
    for path, examples in zip(files.values(), demo_examples(seed)):
        path.write_text("".join(json.dumps({"text": e.texts[0], "label": LABELS[e.label]}) + "\n" for e in examples))
    return files


def load_shipped() -> tuple[list, list]:
    """(train, dev) read from the package's JSONL files."""
    from .tasks import read_table

    files = shipped_files()
    label_map = {lab: i for i, lab in enumerate(LABELS)}
    return tuple(read_table(files[s], ["text"], "label", label_map) for s in ("train", "dev"))


if __name__ == "__main__":
    for p in write().values():
        print(p)
