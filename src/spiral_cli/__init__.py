"""spiral: Sequential-Parallel-Aggregative RL for language models."""
__version__ = "0.1.0"


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when the message is empty), cut to
    `limit` characters: what a one-line error or warning quotes of a library's multi-line failure."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]
