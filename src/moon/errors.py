"""The one exception type for mistakes a user can fix: the CLI prints it on one line and exits 2."""


class UserError(Exception):
    """A bad config key, a missing file, an input that cannot be read: says what is wrong and how to fix it."""
