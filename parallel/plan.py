"""How a model declares its parallelisation, as plain data the engine applies.

A spec fills a `ParallelPlan` with module-path patterns (`fnmatch` globs over `named_modules()` names);
the engine never imports model code and the model never calls a collective.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TPRegion:
    """A module whose body runs tensor-parallel (heads / hidden split over tp).

    `seq_args` are sequence-sharded activations (dim 1) entering the region: all-gathered over tp under
    sequence parallelism, otherwise copied (identity forward, all-reduce backward). `replicated_args`
    (e.g. the text context of cross-attention) are identical on every rank and never sharded.
    """

    seq_args: tuple[str, ...] = ("x",)
    replicated_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class ParallelPlan:
    """Everything the engine needs to shard a model; see docs/parallelism.md."""

    blocks: str
    """Dotted path of the ModuleList of transformer blocks: the FSDP and recompute unit."""
    colwise: tuple[str, ...] = ()
    """nn.Linear patterns split on output features over tp (their outputs are head/hidden shards)."""
    rowwise: tuple[str, ...] = ()
    """nn.Linear patterns split on input features over tp (their partial outputs are summed)."""
    regions: dict[str, TPRegion] = field(default_factory=dict)
    """Module pattern → how its inputs enter the tensor-parallel region."""
    sharded_norms: tuple[str, ...] = ()
    """RMSNorm patterns whose normalised (last) dim is a colwise output split over tp (e.g. a QK-norm over
    all heads): the engine all-reduces their sums of squares and shards their weight like that output."""
    self_attention: tuple[str, ...] = ()
    """Attention-core patterns attending over the (context-parallel) video sequence."""
    sequence_inputs: dict[str, int] = field(default_factory=dict)
    """Root forward keyword → its sequence dim; these are padded and sharded over cp (and tp with SP)."""
    token_mask: str = ""
    """Root forward keyword for the bool mask (padded length,) of real tokens, which the model hands to each
    self-attention core as `kv_valid`. The engine fills it when it pads a sequence that does not divide
    the shard count (cp, times tp under SP); leaving it empty makes such a sequence an error."""
    sequence_output_dim: int = 1
    """The root output's sequence dim (it stays sharded; the loss is computed on the local shard)."""
    head_counts: dict[str, int] = field(default_factory=dict)
    """Attention name → number of heads, so mesh sizes can be checked against them."""
