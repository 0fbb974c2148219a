"""An example megagen model spec living outside megagen (registered by the `megagen.specs` entry point)."""

from megagen_plugin_example.spec import SPEC, VideoDiTSpec

__all__ = ["SPEC", "VideoDiTSpec"]
