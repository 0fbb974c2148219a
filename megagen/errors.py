"""Errors raised for bad user input; the CLI prints them as one line and exits non-zero."""


class ConfigError(ValueError):
    """A config value is unknown, mistyped or impossible. `key` is the dotted path, e.g. `parallel.tp`."""

    label = "config error"

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{self.label}: {key}: {message}")


class UsageError(ConfigError):
    """A command used in a way it cannot honour (an output that exists, a tool that is missing): `key`
    names the argument or file. Not retried, like a config error."""

    label = "error"
