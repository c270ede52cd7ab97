"""Tiny random models of every supported architecture family, for tests and examples (offline)."""

from __future__ import annotations

import torch
from torch import nn

FAMILIES = ("bert", "roberta", "deberta-v2", "gpt2", "llama", "opt", "bart", "t5", "vit")
H, L, HEADS, FF, VOCAB = 32, 4, 4, 64, 101


def tiny_model(family: str, seed: int = 0, layers: int | None = None, hidden: int | None = None) -> nn.Module:
    """A small randomly initialized model (hidden 32 or ``hidden``, a multiple of 4; 4 blocks or ``layers``;
    enc-dec: 2 + 2) in eval mode."""
    import transformers as tf

    L = layers or globals()["L"]  # noqa: N806
    H = hidden or globals()["H"]  # noqa: N806

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB)
    if family == "bert":
        cfg = tf.BertConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS, intermediate_size=FF,
                            max_position_embeddings=64, num_labels=3, **common)
        m = tf.BertForSequenceClassification(cfg)
    elif family == "roberta":
        cfg = tf.RobertaConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS, intermediate_size=FF,
                               max_position_embeddings=70, num_labels=3, pad_token_id=1, **common)
        m = tf.RobertaForSequenceClassification(cfg)
    elif family == "deberta-v2":
        cfg = tf.DebertaV2Config(hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS, intermediate_size=FF,
                                 max_position_embeddings=64, num_labels=3, relative_attention=True,
                                 pos_att_type=["p2c", "c2p"], max_relative_positions=16, position_buckets=8, **common)
        m = tf.DebertaV2ForSequenceClassification(cfg)
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_embd=H, n_layer=L, n_head=HEADS, n_positions=64, **common)
        m = tf.GPT2LMHeadModel(cfg)
    elif family == "llama":
        cfg = tf.LlamaConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS, num_key_value_heads=2,
                             intermediate_size=FF, max_position_embeddings=64, **common)
        m = tf.LlamaForCausalLM(cfg)
    elif family == "opt":
        cfg = tf.OPTConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS, ffn_dim=FF,
                           max_position_embeddings=64, word_embed_proj_dim=H, **common)
        m = tf.OPTForCausalLM(cfg)
    elif family == "bart":
        cfg = tf.BartConfig(d_model=H, encoder_layers=2, decoder_layers=2, encoder_attention_heads=HEADS,
                            decoder_attention_heads=HEADS, encoder_ffn_dim=FF, decoder_ffn_dim=FF,
                            max_position_embeddings=64, **common)
        m = tf.BartForConditionalGeneration(cfg)
    elif family == "t5":
        cfg = tf.T5Config(d_model=H, d_kv=H // HEADS, d_ff=FF, num_layers=2, num_decoder_layers=2, num_heads=HEADS,
                          decoder_start_token_id=0, **common)
        m = tf.T5ForConditionalGeneration(cfg)
    elif family == "vit":
        cfg = tf.ViTConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS, intermediate_size=FF,
                           image_size=16, patch_size=4, num_channels=3, num_labels=3)
        m = tf.ViTForImageClassification(cfg)
    else:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    return m.eval()


def tiny_inputs(family: str, batch: int = 2, seq: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """Inputs for :func:`tiny_model` (with padding in the attention mask where it applies)."""
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1 and family not in ("gpt2", "llama", "opt"):
        mask[-1, -2:] = 0  # right padding on the last example
    out = {"input_ids": ids, "attention_mask": mask}
    if family in ("bart", "t5"):
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
    return out


def output_tensor(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def loss_of(model: nn.Module, inputs: dict) -> torch.Tensor:
    """A scalar training loss that involves every output."""
    return output_tensor(model(**inputs)).float().pow(2).mean()
