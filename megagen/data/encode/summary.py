"""The encode job's summary: what came in, what was encoded, skipped and why, which decoder did it.

Each rank counts its share; rank 0 adds them up and prints one summary (or JSON with `--json`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class EncodeSummary:
    inputs: int = 0
    """Inputs of this share (after merging: of the whole job)."""
    encoded: int = 0
    skipped_done: int = 0
    """Inputs finished (encoded or found bad) by an earlier run of the same job."""
    bad: Counter = field(default_factory=Counter)
    """reason → inputs found unusable in this run (corrupt, truncated, too_short, unsupported, ...)."""
    decoded_with: Counter = field(default_factory=Counter)
    """"dali" / "pyav" → clips each decoder decoded in this run."""
    seconds: float = 0.0
    out: str = ""
    samples: int = 0
    """Samples in the written manifest (rank 0, after merging)."""

    @classmethod
    def merged(cls, parts: list[EncodeSummary]) -> EncodeSummary:
        total = cls(out=parts[0].out, samples=parts[0].samples)
        for p in parts:
            total.inputs += p.inputs
            total.encoded += p.encoded
            total.skipped_done += p.skipped_done
            total.bad.update(p.bad)
            total.decoded_with.update(p.decoded_with)
            total.seconds = max(total.seconds, p.seconds)
        return total

    def to_dict(self) -> dict:
        return {
            "out": self.out,
            "inputs": self.inputs,
            "encoded": self.encoded,
            "skipped_done": self.skipped_done,
            "bad": dict(sorted(self.bad.items())),
            "decoded_with": dict(sorted(self.decoded_with.items())),
            "samples": self.samples,
            "seconds": round(self.seconds, 3),
        }

    def format(self) -> str:
        bad = ", ".join(f"{k} {v}" for k, v in sorted(self.bad.items())) or "none"
        decoded = ", ".join(f"{k} {v}" for k, v in sorted(self.decoded_with.items())) or "none"
        return (
            f"encoded {self.out}: {self.inputs} input(s), {self.encoded} encoded, {self.skipped_done} done "
            f"earlier, bad: {bad}; decoded with: {decoded}; {self.samples} sample(s) in the manifest; "
            f"{self.seconds:.1f} s"
        )
