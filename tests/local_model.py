"""A tiny BERT (peftlab.testing) with a matching 101-token WordPiece tokenizer, saved as a local model folder."""

from __future__ import annotations

from pathlib import Path

WORDS = ("good bad fine awful great film movie plot the a was is it not very really and of to i loved hated "
         "dull wonderful boring nice".split())


def save_tiny_bert(path: Path) -> str:
    import transformers

    from peftlab.testing import VOCAB, tiny_model

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "?", *WORDS]
    vocab += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab += [f"##{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
    vocab = list(dict.fromkeys(vocab))[:VOCAB]
    vocab += [f"[unused{i}]" for i in range(VOCAB - len(vocab))]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(path)
    tiny_model("bert").bert.save_pretrained(path)  # the encoder only: heads are sized by each run
    return str(path)
