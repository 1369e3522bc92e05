"""Errors bnnc raises for bad input. The CLI prints them as one line and exits non-zero."""


class BnncError(Exception):
    """Base class: a problem with the user's input or environment, with a message naming it."""


class DatasetNotFoundError(BnncError):
    pass


class ModelFormatError(BnncError):
    """A file that is not a valid model of the expected form (ONNX, artifact, checkpoint)."""


class UnsupportedOpError(BnncError):
    pass
