"""The one exception type for user errors: the CLI prints its message in one line and exits 2."""


class UserError(Exception):
    """A problem with the user's input (path, override, corpus, out_dir) and how to fix it."""
