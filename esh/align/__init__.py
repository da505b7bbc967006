"""Representation alignment: mutual k-nearest neighbours, CKA and CKNNA, blocked for large n."""

from .metrics import METRICS, AlignmentInputError, cka, cknna, clip_outliers, mknn, score

__all__ = ["METRICS", "AlignmentInputError", "cka", "cknna", "clip_outliers", "mknn", "score"]
