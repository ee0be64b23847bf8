"""The one exception type for mistakes a user can fix (bad config, bad data, missing file)."""


class UserError(Exception):
    """A problem in the user's input. The CLI prints its message on one line and exits with 2.

    The message must name what is wrong precisely enough to fix it: the config key, the file
    and line, or the column.
    """


def printable(message: str, limit: int = 400) -> str:
    """`message` as one printable line: control characters and the like escaped (a junk file's
    bytes in a column name must not reach the terminal raw), cut to `limit` characters."""
    line = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in message)
    return line if len(line) <= limit else line[:limit - 3] + "..."


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a
    one-line error keeps of a library's multi-line one."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
