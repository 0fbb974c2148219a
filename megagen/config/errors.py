"""Errors raised for bad user input; the CLI prints them as one line and exits non-zero."""


class ConfigError(ValueError):
    """A config value is unknown, mistyped or impossible. `key` is the dotted path, e.g. `parallel.tp`."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config error: {key}: {message}")
