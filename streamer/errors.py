"""Exceptions for mistakes a user can fix: the CLI prints their message, never a traceback."""


class StreamerError(Exception):
    """Base class: the message names the thing that is wrong and how to fix it."""


class CheckpointError(StreamerError):
    """A source checkpoint is missing, incomplete or not one streamer understands."""


class PackedFormatError(StreamerError):
    """A packed model directory is missing, corrupt or from another format version."""


class ConfigError(StreamerError):
    """A flag or config value is invalid."""
