"""Typed errors of model loading."""


class ModelError(Exception):
    """A model directory that cannot be served; the message says what to change."""


class ModelNotFound(ModelError):
    pass


class UnsupportedModel(ModelError):
    pass


class CheckpointMismatch(ModelError):
    """Missing, unexpected or wrongly-shaped tensors in the checkpoint."""
