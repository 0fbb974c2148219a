"""Test helpers: diffusers' WanTransformer3DModel from the tiny preset, and its weights copied into megagen's
wan (a test-local mapping, so the equality test does not depend on the checkpoint importer)."""

from __future__ import annotations

from megagen.specs.wan.model import WanArch, WanTransformer


def diffusers_wan(arch: WanArch):
    """A randomly initialised diffusers Wan with the sizes of `arch` (nothing downloaded)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=arch.patch,
        num_attention_heads=arch.heads,
        attention_head_dim=arch.head_dim,
        in_channels=arch.latent_channels,
        out_channels=arch.latent_channels,
        text_dim=arch.text_dim,
        freq_dim=arch.freq_dim,
        ffn_dim=arch.ffn,
        num_layers=arch.layers,
        cross_attn_norm=arch.cross_attn_norm,
        qk_norm="rms_norm_across_heads",
        eps=arch.eps,
        rope_max_seq_len=arch.rope_max_seq_len,
    )


def _block_names(i: int) -> dict[str, str]:
    names = {f"blocks.{i}.cross_norm.{p}": f"blocks.{i}.norm2.{p}" for p in ("weight", "bias")}
    names[f"blocks.{i}.mod_table"] = f"blocks.{i}.scale_shift_table"
    for mine, theirs in (("attn", "attn1"), ("cross_attn", "attn2")):
        for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0")):
            for p in ("weight", "bias"):
                names[f"blocks.{i}.{mine}.{a}.{p}"] = f"blocks.{i}.{theirs}.{b}.{p}"
        for a, b in (("q_norm", "norm_q"), ("k_norm", "norm_k")):
            names[f"blocks.{i}.{mine}.{a}.weight"] = f"blocks.{i}.{theirs}.{b}.weight"
    for a, b in (("w1", "ffn.net.0.proj"), ("w2", "ffn.net.2")):
        for p in ("weight", "bias"):
            names[f"blocks.{i}.mlp.{a}.{p}"] = f"blocks.{i}.{b}.{p}"
    return names


def diffusers_names(layers: int) -> dict[str, str]:
    """megagen parameter name → diffusers parameter name."""
    names = {"out_table": "scale_shift_table"}
    for p in ("weight", "bias"):
        names[f"patch_embed.{p}"] = f"patch_embedding.{p}"
        names[f"time_mod.{p}"] = f"condition_embedder.time_proj.{p}"
        names[f"out_proj.{p}"] = f"proj_out.{p}"
        for fc, lin in (("fc1", "linear_1"), ("fc2", "linear_2")):
            names[f"time_embed.{fc}.{p}"] = f"condition_embedder.time_embedder.{lin}.{p}"
            names[f"text_embed.{fc}.{p}"] = f"condition_embedder.text_embedder.{lin}.{p}"
    for i in range(layers):
        names.update(_block_names(i))
    return names


def megagen_from_diffusers(reference, arch: WanArch) -> WanTransformer:
    """megagen's wan holding exactly the reference's weights (reshaped where the layouts differ)."""
    model = WanTransformer(arch)
    theirs = reference.state_dict()
    names = diffusers_names(arch.layers)
    mine = {n: theirs[names[n]].reshape(p.shape) for n, p in model.named_parameters()}
    model.load_state_dict(mine, strict=True)
    return model
