"""The one exception type a user sees: a single line saying what was wrong and what to do."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none): what a
    one-line error quotes from a library's exception."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class SaecacheError(Exception):
    """A user error or an environment failure (bad value, mismatched cache, full disk).

    The CLI prints the message alone on one line and exits non-zero; anything else that
    escapes is a bug and keeps its traceback.
    """
