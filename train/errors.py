"""The one exception type for mistakes a user can fix (bad config, bad data, missing file)."""


class UserError(Exception):
    """A problem in the user's input. The CLI prints its message on one line and exits with 2.

    The message must name what is wrong precisely enough to fix it: the config key, the file
    and line, or the column.
    """
