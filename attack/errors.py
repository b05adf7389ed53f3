"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2, no traceback."""
