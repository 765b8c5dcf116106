"""The one exception type a user sees: a single line saying what was wrong and what to do."""


class SaecacheError(Exception):
    """A user error or an environment failure (bad value, mismatched cache, full disk).

    The CLI prints the message alone on one line and exits non-zero; anything else that
    escapes is a bug and keeps its traceback.
    """
