"""The one error type for a user's input that is refused: the CLI prints it as one line and exits 2, the
endpoint answers 4xx in OpenAI's shape, a batch job writes it as the row's error. Torch- and Ray-free."""
from __future__ import annotations


class InputError(ValueError):
    """A bad input or setting, named in the message (never an internal failure); `field` names it where one
    field is at fault (the front end's name for it: `--top-p`, `top_p`)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field
