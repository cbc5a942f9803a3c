"""Errors that more than one part of the service raises."""


class ConfigError(Exception):
    """A missing or invalid setting; the message names the variable, or the file and key."""
