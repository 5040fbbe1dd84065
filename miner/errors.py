"""Errors any part of the miner may raise about its configuration or its start; this module imports
nothing of the project, so everything can import it."""


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and key."""


class StartupError(Exception):
    """The miner cannot start; the message says what to fix."""
