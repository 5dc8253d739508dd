"""The error of a checkpoint that cannot be saved or loaded."""


class CheckpointError(ValueError):
    """A checkpoint or --save/--load directory that cannot be used; the message names the file or flag."""
