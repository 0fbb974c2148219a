"""The `wan` spec ↔ diffusers' `WanTransformer3DModel`: tensor rules and config (external_format.py).

Every tensor is diffusers' own except three layouts: the Conv3d patch embedding (d, C, pt, ph, pw) is
`patch_embed`'s (d, C·pt·ph·pw) weight (the spec's patch vectors are ordered C, pt, ph, pw, as the kernel
flattens), and the modulation tables (1, 6, d) / (1, 2, d) drop their leading 1. `proj_out` needs no
permutation: the spec's output patch vectors are in the (pt, ph, pw, C) order diffusers unpatchifies.
"""

from __future__ import annotations

from megagen.checkpoint.external_format import TensorRule

CLASS_NAME = "WanTransformer3DModel"
DIFFUSERS_ROPE_THETA = 10000.0  # fixed in diffusers' WanRotaryPosEmbed


def outside_config(arch) -> dict:
    """diffusers' config.json fields for the preset (T2V: no image branch)."""
    if arch.rope_theta != DIFFUSERS_ROPE_THETA:
        from megagen.checkpoint.layout import CheckpointError

        raise CheckpointError("model.preset", f"rope_theta {arch.rope_theta} has no diffusers equivalent")
    return {
        "_class_name": CLASS_NAME,
        "patch_size": list(arch.patch),
        "num_attention_heads": arch.heads,
        "attention_head_dim": arch.head_dim,
        "in_channels": arch.latent_channels,
        "out_channels": arch.latent_channels,
        "text_dim": arch.text_dim,
        "freq_dim": arch.freq_dim,
        "ffn_dim": arch.ffn,
        "num_layers": arch.layers,
        "cross_attn_norm": arch.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads",
        "eps": arch.eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": arch.rope_max_seq_len,
        "pos_embed_seq_len": None,
    }


def _linear(rules: dict, mine: str, theirs: str, out_dim: int, in_dim: int) -> None:
    rules[f"{mine}.weight"] = TensorRule((f"{theirs}.weight",), ((out_dim, in_dim),))
    rules[f"{mine}.bias"] = TensorRule((f"{theirs}.bias",), ((out_dim,),))


def _vector(rules: dict, mine: str, theirs: str, dim: int) -> None:
    rules[mine] = TensorRule((theirs,), ((dim,),))


def _block(rules: dict, i: int, arch) -> None:
    d, mine = arch.dim, f"blocks.{i}"
    theirs = mine  # the block prefix is the same in both
    for attn, ref in (("attn", "attn1"), ("cross_attn", "attn2")):
        for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0")):
            _linear(rules, f"{mine}.{attn}.{a}", f"{theirs}.{ref}.{b}", d, d)
        _vector(rules, f"{mine}.{attn}.q_norm.weight", f"{theirs}.{ref}.norm_q.weight", d)
        _vector(rules, f"{mine}.{attn}.k_norm.weight", f"{theirs}.{ref}.norm_k.weight", d)
    if arch.cross_attn_norm:
        _vector(rules, f"{mine}.cross_norm.weight", f"{theirs}.norm2.weight", d)
        _vector(rules, f"{mine}.cross_norm.bias", f"{theirs}.norm2.bias", d)
    _linear(rules, f"{mine}.mlp.w1", f"{theirs}.ffn.net.0.proj", arch.ffn, d)
    _linear(rules, f"{mine}.mlp.w2", f"{theirs}.ffn.net.2", d, arch.ffn)
    rules[f"{mine}.mod_table"] = TensorRule((f"{theirs}.scale_shift_table",), ((1, 6, d),), squeeze=1)


def tensor_rules(arch) -> dict[str, TensorRule]:
    """megagen parameter name → how it is read from diffusers' tensors."""
    d, (pt, ph, pw) = arch.dim, arch.patch
    conv = (d, arch.latent_channels, pt, ph, pw)
    rules = {"patch_embed.weight": TensorRule(("patch_embedding.weight",), (conv,), flatten=True)}
    _vector(rules, "patch_embed.bias", "patch_embedding.bias", d)
    _linear(rules, "time_embed.fc1", "condition_embedder.time_embedder.linear_1", d, arch.freq_dim)
    _linear(rules, "time_embed.fc2", "condition_embedder.time_embedder.linear_2", d, d)
    _linear(rules, "time_mod", "condition_embedder.time_proj", 6 * d, d)
    _linear(rules, "text_embed.fc1", "condition_embedder.text_embedder.linear_1", d, arch.text_dim)
    _linear(rules, "text_embed.fc2", "condition_embedder.text_embedder.linear_2", d, d)
    for i in range(arch.layers):
        _block(rules, i, arch)
    rules["out_table"] = TensorRule(("scale_shift_table",), ((1, 2, d),), squeeze=1)
    _linear(rules, "out_proj", "proj_out", arch.patch_dim, d)
    return rules
