"""Exceptions raised by :mod:`cxr_model`."""

from __future__ import annotations


class ModelError(Exception):
    """A model directory, a model card, its weights or an input is unusable.

    The message always names what is wrong (which file, which field, which
    value) so that it can be shown to an operator as it is.
    """


class ImageRefused(ModelError):
    """An input is deliberately not scored (wrong kind of image, unreadable file).

    ``reason`` is a short human-readable text that ends up in the worklist or
    in the CLI's ``"reason"`` field; callers such as a DICOM reader raise it to
    make a file *skipped* rather than *failed*.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
