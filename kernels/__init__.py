"""Fused ops, each beside its plain-PyTorch reference, selected by one backend registry (`backend.py`).

Every op is a plain function (`rms_norm`, `swiglu`, …) that dispatches on the configured
`kernels.backend` and the tensor's device; `*_reference` is the numerics each fast path is tested against.
"""

if __name__ != "megagen.kernels":  # the clone is on sys.path and someone wants PyPI's `kernels`
    from megagen.import_shadow import step_aside

    step_aside(__name__, __file__)
else:
    from megagen.kernels.attention import AttentionCore, attention, attention_math, attention_reference
    from megagen.kernels.backend import configure, report_extras
    from megagen.kernels.linear import Linear
    from megagen.kernels.modulation import (
        gated_residual,
        gated_residual_reference,
        modulate,
        modulate_reference,
    )
    from megagen.kernels.norm import (
        RMSNorm,
        rms_norm,
        rms_norm_modulate,
        rms_norm_modulate_reference,
        rms_norm_reference,
    )
    from megagen.kernels.position import (
        factorized_position,
        factorized_position_reference,
        rotary,
        rotary_frequencies,
        rotary_reference,
    )
    from megagen.kernels.swiglu import swiglu, swiglu_reference

__all__ = [
    "AttentionCore",
    "Linear",
    "RMSNorm",
    "attention",
    "attention_math",
    "attention_reference",
    "configure",
    "factorized_position",
    "factorized_position_reference",
    "gated_residual",
    "gated_residual_reference",
    "modulate",
    "modulate_reference",
    "report_extras",
    "rms_norm",
    "rms_norm_modulate",
    "rms_norm_modulate_reference",
    "rms_norm_reference",
    "rotary",
    "rotary_frequencies",
    "rotary_reference",
    "swiglu",
    "swiglu_reference",
]
