"""Errors an engine raises for input the caller can fix.

The serving layer maps every `EngineInputError` to a 400 in the OpenAI error shape; anything else an engine
raises is a server fault. Keeping the distinction here means `models/` decides what is the caller's mistake.
"""


class EngineInputError(ValueError):
    """The request cannot be served as sent (too long, malformed token ids, bad dimensions...)."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
