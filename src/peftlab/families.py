"""Architecture families: where the transformer blocks are, and the *roles* of modules inside a block.

Methods speak in roles ("q and v of layers 0-3"), never in module paths. A new architecture is one
:class:`Family` entry here. Role paths are relative to a block and may contain ``*`` wildcards;
a role can map to several paths (GPT-2's fused ``c_attn`` serves q, k and v).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .slot import walk


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    stacks: tuple[str, ...]  # suffixes of the block ModuleLists, in forward order
    roles: dict[str, tuple[str, ...]]
    kind: str = "encoder"  # encoder | decoder | encoder-decoder | vision
    notes: dict[str, str] = field(default_factory=dict)
    # module (full name suffix, outside the blocks) that takes input_ids/inputs_embeds/attention_mask and
    # runs the embeddings and the (encoder) stack; used by input-extension methods (prompt tuning)
    input_stack: tuple[str, ...] = ()


_BERT_LIKE = {
    "q": ("attention.self.query",),
    "k": ("attention.self.key",),
    "v": ("attention.self.value",),
    "o": ("attention.output.dense",),
    "ffn_in": ("intermediate.dense",),
    "ffn_out": ("output.dense",),
    "attn": ("attention.self",),
    "attn_block": ("attention",),
    "attn_norm": ("attention.output.LayerNorm",),
    "ffn_norm": ("output.LayerNorm",),
    # sub-blocks called as f(hidden_states, input_tensor) that add the residual: they see the
    # sub-layer's input (for parallel adapters)
    "ffn_residual": ("output",),
    "attn_residual": ("attention.output",),
}

FAMILIES: tuple[Family, ...] = (
    Family(
        "bert",
        ("bert", "roberta", "xlm-roberta", "electra", "camembert", "mpnet"),
        ("encoder.layer",),
        _BERT_LIKE,
        input_stack=("bert", "roberta", "electra", "mpnet", "camembert"),
    ),
    Family(
        "deberta-v2",
        ("deberta-v2", "deberta"),
        ("encoder.layer",),
        {
            **_BERT_LIKE,
            "q": ("attention.self.query_proj", "attention.self.in_proj"),
            "k": ("attention.self.key_proj", "attention.self.in_proj"),
            "v": ("attention.self.value_proj", "attention.self.in_proj"),
        },
        input_stack=("deberta",),
    ),
    Family(
        "vit",
        ("vit", "deit"),
        ("encoder.layer", "layers"),
        {  # transformers < 5 and >= 5 layouts
            "q": ("attention.attention.query", "attention.q_proj"),
            "k": ("attention.attention.key", "attention.k_proj"),
            "v": ("attention.attention.value", "attention.v_proj"),
            "o": ("attention.output.dense", "attention.o_proj"),
            "ffn_in": ("intermediate.dense", "mlp.fc1"),
            "ffn_out": ("output.dense", "mlp.fc2"),
            "attn": ("attention.attention", "attention"),
            "ffn": ("mlp",),
            "ffn_residual": ("output",),
            "attn_norm": ("layernorm_before",),
            "ffn_norm": ("layernorm_after",),
        },
        kind="vision",
    ),
    Family(
        "gpt2",
        ("gpt2",),
        ("h",),
        {
            "q": ("attn.c_attn",),
            "k": ("attn.c_attn",),
            "v": ("attn.c_attn",),
            "o": ("attn.c_proj",),
            "ffn_in": ("mlp.c_fc",),
            "ffn_out": ("mlp.c_proj",),
            "attn": ("attn",),
            "ffn": ("mlp",),
            "attn_norm": ("ln_1",),
            "ffn_norm": ("ln_2",),
        },
        input_stack=("transformer",),
        kind="decoder",
        notes={"q": "GPT-2 fuses q, k and v in one Conv1D (attn.c_attn)"},
    ),
    Family(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"),
        ("layers",),
        {
            "q": ("self_attn.q_proj",),
            "k": ("self_attn.k_proj",),
            "v": ("self_attn.v_proj",),
            "o": ("self_attn.o_proj",),
            "ffn_gate": ("mlp.gate_proj",),
            "ffn_in": ("mlp.up_proj",),
            "ffn_out": ("mlp.down_proj",),
            "attn": ("self_attn",),
            "ffn": ("mlp",),
            "attn_norm": ("input_layernorm",),
            "ffn_norm": ("post_attention_layernorm",),
        },
        input_stack=("model",),
        kind="decoder",
    ),
    Family(
        "opt",
        ("opt",),
        ("decoder.layers",),
        {
            "q": ("self_attn.q_proj",),
            "k": ("self_attn.k_proj",),
            "v": ("self_attn.v_proj",),
            "o": ("self_attn.out_proj",),
            "ffn_in": ("fc1",),
            "ffn_out": ("fc2",),
            "attn": ("self_attn",),
            "attn_norm": ("self_attn_layer_norm",),
            "ffn_norm": ("final_layer_norm",),
        },
        input_stack=("model.decoder",),
        kind="decoder",
    ),
    Family(
        "bart",
        ("bart", "mbart", "marian", "pegasus"),
        ("encoder.layers", "decoder.layers"),
        {
            "q": ("self_attn.q_proj",),
            "k": ("self_attn.k_proj",),
            "v": ("self_attn.v_proj",),
            "o": ("self_attn.out_proj",),
            "cross_q": ("encoder_attn.q_proj",),
            "cross_k": ("encoder_attn.k_proj",),
            "cross_v": ("encoder_attn.v_proj",),
            "cross_o": ("encoder_attn.out_proj",),
            "ffn_in": ("fc1",),
            "ffn_out": ("fc2",),
            "attn": ("self_attn",),
            "cross_attn": ("encoder_attn",),
            "attn_norm": ("self_attn_layer_norm",),
            "cross_norm": ("encoder_attn_layer_norm",),
            "ffn_norm": ("final_layer_norm",),
        },
        input_stack=("model.encoder",),
        kind="encoder-decoder",
    ),
    Family(
        "t5",
        ("t5", "mt5", "umt5"),
        ("encoder.block", "decoder.block"),
        {
            "q": ("layer.0.SelfAttention.q",),
            "k": ("layer.0.SelfAttention.k",),
            "v": ("layer.0.SelfAttention.v",),
            "o": ("layer.0.SelfAttention.o",),
            "cross_q": ("layer.1.EncDecAttention.q",),
            "cross_k": ("layer.1.EncDecAttention.k",),
            "cross_v": ("layer.1.EncDecAttention.v",),
            "cross_o": ("layer.1.EncDecAttention.o",),
            "ffn_gate": ("layer.*.DenseReluDense.wi_0",),
            "ffn_in": ("layer.*.DenseReluDense.wi", "layer.*.DenseReluDense.wi_1"),
            "ffn_out": ("layer.*.DenseReluDense.wo",),
            "attn": ("layer.0.SelfAttention",),
            "cross_attn": ("layer.1.EncDecAttention",),
            "ffn": ("layer.*.DenseReluDense",),
            "attn_norm": ("layer.0.layer_norm",),
            "ffn_norm": ("layer.*.layer_norm",),
        },
        input_stack=("encoder",),
        kind="encoder-decoder",
    ),
)

LINEAR_ROLES = ("q", "k", "v", "o", "cross_q", "cross_k", "cross_v", "cross_o", "ffn_gate", "ffn_in", "ffn_out")


def model_type(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def family_of(model: nn.Module) -> Family | None:
    mt = model_type(model)
    for fam in FAMILIES:
        if mt in fam.model_types:
            return fam
    return None


def find_blocks(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """All transformer blocks as ``(global_index, full_name, module)``, encoder blocks first.

    Known families use their stack table; otherwise the longest ``nn.ModuleList`` named
    ``layer``/``layers``/``h``/``block``/``blocks`` is taken as the stack.
    """
    fam = family_of(model)
    lists = [(n, m) for n, m in walk(model) if isinstance(m, nn.ModuleList)]
    stacks: list[tuple[str, nn.ModuleList]] = []
    if fam is not None:
        for suffix in fam.stacks:
            for n, m in lists:
                if n == suffix or n.endswith("." + suffix):
                    stacks.append((n, m))
                    break
            if stacks and fam.kind != "encoder-decoder":
                break  # single-stack families may list alternative layouts
    if not stacks:
        cands = [(n, m) for n, m in lists if n.rsplit(".", 1)[-1] in ("layer", "layers", "h", "block", "blocks")]
        if cands:
            stacks.append(max(cands, key=lambda nm: len(nm[1])))
    out, i = [], 0
    for n, m in stacks:
        for j, blk in enumerate(m):
            out.append((i, f"{n}.{j}", blk))
            i += 1
    return out
