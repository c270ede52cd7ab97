"""Tiny BERT and LLaMA models (peftlab.testing) with a matching 101-token WordPiece tokenizer, saved as local model folders."""

from __future__ import annotations

from pathlib import Path

WORDS = ("good bad fine awful great film movie plot the a was is it not very really and of to i loved hated "
         "dull wonderful boring nice".split())


def _save_tokenizer(path: Path) -> None:
    import transformers

    from peftlab.testing import VOCAB

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "?", *WORDS]
    vocab += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab += [f"##{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
    vocab = list(dict.fromkeys(vocab))[:VOCAB]
    vocab += [f"[unused{i}]" for i in range(VOCAB - len(vocab))]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(path)


def save_tiny_bert(path: Path) -> str:
    from peftlab.testing import tiny_model

    _save_tokenizer(path)
    tiny_model("bert").bert.save_pretrained(path)  # the encoder only: heads are sized by each run
    return str(path)


def save_tiny_llama(path: Path) -> str:
    """A tiny LLaMA (decoder blocks: LlamaDecoderLayer) with the same WordPiece tokenizer ([PAD] = 0)."""
    from peftlab.testing import tiny_model

    _save_tokenizer(path)
    model = tiny_model("llama")
    model.config.pad_token_id = 0
    model.save_pretrained(path)
    return str(path)
