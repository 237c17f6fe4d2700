"""The one exception type for mistakes a user can make (bad input, wrong flags, missing files)."""


class BertError(Exception):
    """A problem the user can fix; the CLI prints its message on one line and exits with status 1."""
