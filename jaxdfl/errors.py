"""Error types shared by the host-side code."""


class ConfigError(ValueError):
    """A setting is invalid. The message is one line naming the key and what is allowed."""


def first_line(err: BaseException) -> str:
    """``"TypeError: <first line of the message>"``: a user function's failure, for a one-line ConfigError."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
