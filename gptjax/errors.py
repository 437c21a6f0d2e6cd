"""Exceptions the CLI turns into one line on stderr and an exit status, without a traceback."""


class UserError(Exception):
    """A problem with the user's input (path, override, corpus, out_dir, memory) and how to fix it: exit 2."""


class Stopped(Exception):
    """A run stopped on purpose (a signal), its progress saved: the message says how to resume; exit `code`."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def first_line(x, default: str = "") -> str:
    """The first non-blank line of str(x), stripped and cut at 200 characters (an exception's gist), or default."""
    lines = [line.strip() for line in str(x).splitlines() if line.strip()]
    return lines[0][:200] if lines else default
