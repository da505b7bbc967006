"""Representation alignment: mutual k-nearest neighbours and CKA, blocked for large n."""

from .metrics import AlignmentInputError, cka, mknn

__all__ = ["AlignmentInputError", "cka", "mknn"]
