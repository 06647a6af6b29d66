"""The one exception type for bad input.

Every check of user input (a config value, a shape, a token id, a checkpoint folder, a task parameter) raises
`InputError` with a message that names the bad value and says what was expected. It subclasses `ValueError`, so
callers that catch `ValueError` keep working; the CLI turns it into a one-line message and exit status 2.
"""


class InputError(ValueError):
    """Bad input from the user: the message names the bad value and what is allowed."""
