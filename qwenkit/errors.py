"""The one exception type users see: its message is a complete, single-line explanation."""


class QwenkitError(Exception):
    """A problem with the user's input or environment (not a bug in qwenkit).

    The CLI prints only the message of these, without a traceback, unless --debug is given.
    """
