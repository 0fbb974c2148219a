"""The config errors, defined in `megagen.errors` (which parallel/ and kernels/ may import without pulling in
the config loader); re-exported here for the many modules that import them from the config package."""

from megagen.errors import ConfigError, UsageError

__all__ = ["ConfigError", "UsageError"]
