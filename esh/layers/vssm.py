"""ESH-Vision's SSM path: a bidirectional Mamba over raster-ordered patches.

``BidirectionalVSSM`` is Vision Mamba's "bimamba v2" mixer, ``esh.layers.BiMambaMixer``
(shared ``in_proj``/``out_proj``, per-direction conv, ``x_proj``, ``dt_proj``, ``A_log``,
``D``, both directions in one grouped ``esh.ops.selective_scan`` call), used with its
``lengths`` argument: padded batches of sequences of different lengths, each sequence's
reverse direction over its own first ``lengths[b]`` tokens only. Hard routing's exclusive mode
uses this to scan just the patches routed to the SSM, in raster order.
"""

from __future__ import annotations

from .bimamba import BiMambaMixer, reverse_index

__all__ = ["BidirectionalVSSM", "reverse_index"]


class BidirectionalVSSM(BiMambaMixer):
    """ESH-Vision's name for the bidirectional mixer; see ``BiMambaMixer.forward(x, lengths)``."""
