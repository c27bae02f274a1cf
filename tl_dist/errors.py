"""The one exception type that means "the user gave us something wrong"."""


class UserError(Exception):
    """Bad usage, config, data or file. The CLI prints the message on one line and exits 2.

    The message must name the thing that is wrong (key, file, path) and say what to do.
    """

    exit_code = 2


def one_line(msg: str) -> str:
    return " ".join(str(msg).split())
