"""Error types shared by the host-side code."""


class ConfigError(ValueError):
    """A setting is invalid. The message is one line naming the key and what is allowed."""

