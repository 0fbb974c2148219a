"""Reference workloads that are not megagen specs: a Llama-3-style causal decoder, for checking the cost
model's equations against published training runs (torchtitan's FSDP / FSDP+TP Llama 3 figures)."""

from __future__ import annotations

from megagen.parallel.planner.workload import AttentionUse, LinearUse, ParamShape, RegionUse, Workload


def decoder_lm_workload(
    layers: int, dim: int, ffn: int, heads: int, kv_heads: int, vocab: int, seq: int
) -> Workload:
    """Per-sample workload of a Llama-3 decoder (GQA, SwiGLU, untied output head) at `seq` tokens."""
    hd = dim // heads
    kv = kv_heads * hd
    work = Workload(tokens=seq, layers=layers, heads=heads, hidden=dim)
    for i in range(layers):
        p = f"layers.{i}."
        for name, d_in, d_out, style in (
            ("attn.q", dim, dim, "col"),
            ("attn.k", dim, kv, "col"),
            ("attn.v", dim, kv, "col"),
            ("attn.o", dim, dim, "row"),
            ("mlp.w1", dim, ffn, "col"),
            ("mlp.w3", dim, ffn, "col"),
            ("mlp.w2", ffn, dim, "row"),
        ):
            work.linears.append(LinearUse(p + name, seq, d_in, d_out, style, True))
        work.attention.append(AttentionUse(p + "attn.core", seq, seq, dim, True, causal=True))
        work.regions += [
            RegionUse(p + "attn", ((seq, dim),), ()),  # self-attention inside: local-first, not pieces
            RegionUse(p + "mlp", ((seq, dim),), (), token_wise=True),
        ]
        work.block_params.append(
            [
                ParamShape(p + "attn.q.weight", (dim, dim), 0),
                ParamShape(p + "attn.k.weight", (kv, dim), 0),
                ParamShape(p + "attn.v.weight", (kv, dim), 0),
                ParamShape(p + "attn.o.weight", (dim, dim), 1),
                ParamShape(p + "mlp.w1.weight", (ffn, dim), 0),
                ParamShape(p + "mlp.w3.weight", (ffn, dim), 0),
                ParamShape(p + "mlp.w2.weight", (dim, ffn), 1),
                ParamShape(p + "attn_norm.weight", (dim,), None),
                ParamShape(p + "mlp_norm.weight", (dim,), None),
            ]
        )
    work.linears.append(LinearUse("output", seq, dim, vocab, "rep", False))
    work.root_params = [
        ParamShape("tok_embeddings.weight", (vocab, dim), None),
        ParamShape("norm.weight", (dim,), None),
        ParamShape("output.weight", (vocab, dim), None),
    ]
    return work


LLAMA3 = {
    "8b": dict(layers=32, dim=4096, ffn=14336, heads=32, kv_heads=8, vocab=128256),
    "70b": dict(layers=80, dim=8192, ffn=28672, heads=64, kv_heads=8, vocab=128256),
}
