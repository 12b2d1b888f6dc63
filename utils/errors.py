"""Errors the user can fix. Scripts print their message as one line instead of a traceback."""


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do."""
