"""The one error a configuration raises."""


class ConfigError(ValueError):
    """A bad flag or flag combination; the message names the flags (and the file, for a JSON)."""
