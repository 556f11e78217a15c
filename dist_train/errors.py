"""Errors meant for people: one line, saying what is wrong and what to do."""


class UsageError(Exception):
    """Bad input (config, arguments, files). The CLI prints it and exits 2."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration key is unknown, of the wrong type, or has an invalid value."""


class TrainingError(Exception):
    """The run cannot continue (e.g. too many non-finite gradient norms). Exit 1."""

    exit_code = 1
