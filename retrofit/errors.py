"""One exception type for every user-facing failure: the CLI prints its message as one line."""


class MCError(Exception):
    """A problem the user can fix (bad path, unsupported model, bad option). The message
    is a single line that says what is wrong and what to do."""
