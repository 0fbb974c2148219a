"""Model specs and their registry."""

from megagen.specs.base import ModelSpec
from megagen.specs.registry import get_spec, list_specs, register_spec

__all__ = ["ModelSpec", "get_spec", "list_specs", "register_spec"]
