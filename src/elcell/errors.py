"""Errors that are the user's input, not a bug: the CLI prints their one-line
message (naming the file or row) and exits non-zero, without a traceback."""


class ElcellError(Exception):
    pass


class DataError(ElcellError, ValueError):
    """Bad labels, splits or options."""


class ImageError(ElcellError, ValueError):
    """An image that cannot be used."""


class PretrainedError(ElcellError, RuntimeError):
    """ImageNet weights could not be had or do not fit."""


class ExportError(ElcellError, RuntimeError):
    """An ONNX export that is missing or does not match PyTorch."""
