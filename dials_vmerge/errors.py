"""The one exception type that means "the user gave us something we cannot use".

Programs catch it and print its message as a single line on stderr with exit code 1.
Anything else escaping a program is a bug in dials-vmerge.
"""


class VmergeError(Exception):
    """A user-facing error: the message names the file or parameter and the problem."""


class FileFormatError(VmergeError):
    """A file is missing, unreadable, or not in the format we expected."""


class PhilError(VmergeError):
    """A bad parameter name or value on the command line or in a .phil file."""


class SelectionError(VmergeError):
    """A dataset/image/batch selection that does not fit the data."""
