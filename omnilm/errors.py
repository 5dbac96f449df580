"""The one exception type for bad user input (images, prompts, files)."""


class OmniInputError(ValueError):
    """Bad input from the user: the message says, on one line, what was wrong and what to do."""
