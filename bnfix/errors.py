"""The one error type bnfix raises for bad input; the CLI turns it into one line and exit 2."""


class BnfixError(Exception):
    """A problem with the user's input or environment, phrased for the user (names the file)."""
