"""The data layer's one error type."""


class DataError(ValueError):
    """Bad data input (missing file, empty corpus, a window longer than a split, an unknown task, ...).

    ``str(err)`` is one line naming the input and what was expected; jobs print it and exit 2.
    """
