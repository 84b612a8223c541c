"""User-facing errors: one line, naming the file, line or knob, and what to do."""


class NextSpeedError(Exception):
    """An error caused by input or configuration; the CLI prints it as one line, no traceback."""


class ConfigError(NextSpeedError):
    """A knob has an invalid value (the message names the knob)."""


class StaleInputError(NextSpeedError):
    """An input artifact is missing, half-written, or contradicts the current config."""
