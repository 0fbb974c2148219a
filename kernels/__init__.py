"""Fused ops, each beside its plain-PyTorch reference."""

from megagen.kernels.attention import AttentionCore, attention_reference
from megagen.kernels.modulation import modulate
from megagen.kernels.norm import RMSNorm, rms_norm
from megagen.kernels.swiglu import swiglu

__all__ = ["AttentionCore", "RMSNorm", "attention_reference", "modulate", "rms_norm", "swiglu"]
