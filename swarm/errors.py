"""The few exceptions the project raises on purpose, so that edges can print one line for them."""


class LTESwarmError(Exception):
    """Base class: an error a user can act on, printed as one line without a traceback."""


class ConfigError(LTESwarmError):
    """A config file or option is malformed, unknown or inconsistent."""


class DataError(LTESwarmError):
    """A data spec cannot be resolved or its records cannot be turned into (image, label) pairs."""


class UnverifiedState(LTESwarmError):
    """A resumed coordinator found the swarm ahead of its checkpoint, cannot recompute the rounds in
    between from their contributions, and was not told to adopt what the lease holders hold."""


class Stopped(Exception):
    """The peer was asked to stop (Ctrl+C, SIGTERM): unwinds whatever wait it is in.

    Not an `LTESwarmError`: it is no error, and the roles catch it to leave cleanly."""
