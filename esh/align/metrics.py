"""Alignment metrics between two embeddings of the same n items, computed in row blocks so
that no n x n matrix is ever held (n = 50,000, d = 768 fits a laptop).

* ``mknn``: platonic-universe's mutual k-NN: for every item, its k nearest neighbours by
  cosine similarity in A and in B (the item itself excluded), the mean overlap divided by k.
* ``cka``: linear CKA (Kornblith et al. 2019) from d x d cross-covariances; ``unbiased=True``
  uses the unbiased HSIC estimator (Song et al. 2012), also in O(n d²) without n x n Grams.
* ``cknna``: Huh et al. (2024)'s CKNNA: unbiased HSIC of the cosine kernels restricted to the
  mutual k-NN pairs, normalised like CKA; the masked kernels have at most n k entries, so it is
  computed on those entries alone.
* ``clip_outliers``: Huh et al.'s outlier clipping (``remove_outliers`` of platonic-rep):
  features clamped to ±q-quantile of |x| before the metric. ``mknn(..., clip_quantile=0.95)`` is
  the "Huh et al. 2024" MKNN variant; without it, MKNN is exactly ``pu.metrics.mknn``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from esh.errors import InputError


class AlignmentInputError(InputError):
    """The two embeddings cannot be compared as given."""


def _as_tensor(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        x = np.asarray(x)
        if x.dtype.kind not in "biuf":
            raise AlignmentInputError(f"{name} holds {x.dtype} values; embeddings must be numbers")
    t = torch.as_tensor(x)
    if t.is_complex():
        raise AlignmentInputError(f"{name} holds complex values; embeddings must be real numbers")
    if t.dim() != 2:
        raise AlignmentInputError(f"{name} must be a 2-D (items, features) array; got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.float()
    bad = ~torch.isfinite(t).all(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten()[:5].tolist()
        raise AlignmentInputError(f"{name} has {int(bad.sum())} rows with NaN or inf (e.g. rows {rows})")
    return t


def _check_pair(A, B) -> tuple[Tensor, Tensor]:
    A, B = _as_tensor(A, "A"), _as_tensor(B, "B")
    if A.shape[0] != B.shape[0]:
        raise AlignmentInputError(f"A and B must embed the same items: {A.shape[0]} rows vs {B.shape[0]}")
    return A, B


def knn_indices(X: Tensor, k: int, block_size: int = 1024) -> Tensor:
    """(n, k) indices of each row's k most cosine-similar other rows, in row blocks."""
    n = X.shape[0]
    Xn = torch.nn.functional.normalize(X.double() if X.dtype == torch.float64 else X.float(), dim=1)
    out = torch.empty(n, k, dtype=torch.long)
    for start in range(0, n, block_size):
        stop = min(n, start + block_size)
        sims = Xn[start:stop] @ Xn.T  # (block, n)
        sims[torch.arange(stop - start), torch.arange(start, stop)] = -float("inf")  # not itself
        out[start:stop] = sims.topk(k, dim=1).indices
    return out


def clip_outliers(X: Tensor, q: float, mode: str = "row-mean") -> Tensor:
    """Clamp X to ±t, t the q-quantile of |X| (Huh et al. 2024, platonic-rep ``remove_outliers``).

    ``mode="row-mean"``: t is the mean over rows of each row's q-quantile of |x| (platonic-rep's
    default, ``exact=False``); ``mode="global"``: t is the q-quantile of all |x| (its
    ``exact=True``; pu's ``truncate_percentile`` does the same with numpy's percentile).
    """
    if not 0 < q <= 1:
        raise AlignmentInputError(f"the clipping quantile must be in (0, 1]; got {q}")
    if q == 1:
        return X
    a = X.abs().float()
    if mode == "row-mean":
        t = torch.quantile(a, q, dim=1).mean()
    elif mode == "global":
        flat = a.flatten()
        # platonic-rep's exact=True: sorted |x| at index int(q * numel) (torch.quantile refuses
        # more than 16M elements, kthvalue does not)
        t = flat.kthvalue(min(flat.numel(), int(q * flat.numel()) + 1)).values
    else:
        raise AlignmentInputError(f"clip mode must be 'row-mean' or 'global'; got {mode!r}")
    return X.clamp(-float(t), float(t))


def _clipped(A: Tensor, B: Tensor, clip_quantile: float | None, clip_mode: str) -> tuple[Tensor, Tensor]:
    if clip_quantile is None:
        return A, B
    return clip_outliers(A, clip_quantile, clip_mode), clip_outliers(B, clip_quantile, clip_mode)


def _check_k(k: int, n: int) -> None:
    if n < 2:
        raise AlignmentInputError(f"nearest neighbours need at least 2 items (rows); got {n}")
    if not 1 <= k < n:
        raise AlignmentInputError(f"k must be between 1 and n - 1 = {n - 1} (self excluded); got k={k}")


def mknn(
    A, B, k: int = 10, block_size: int = 1024, clip_quantile: float | None = None, clip_mode: str = "row-mean"
) -> float:
    """Mean overlap of the k-nearest-neighbour sets of each item in A and in B, divided by k.

    Neighbours by cosine similarity, each item's own row excluded: ``pu.metrics.mknn``.
    ``clip_quantile=0.95`` first clips outlier features as Huh et al. (2024) do (see
    :func:`clip_outliers`).
    """
    A, B = _check_pair(A, B)
    n = A.shape[0]
    _check_k(k, n)
    A, B = _clipped(A, B, clip_quantile, clip_mode)
    na, nb = knn_indices(A, k, block_size), knn_indices(B, k, block_size)
    overlap = 0
    for start in range(0, n, block_size):  # sorted set intersection, per block
        a, b = na[start : start + block_size], nb[start : start + block_size]
        overlap += int((a[:, :, None] == b[:, None, :]).any(-1).sum())
    return overlap / (n * k)


def _hsic_unbiased_sparse(rows: Tensor, cols: Tensor, kv: Tensor, lv: Tensor, n: int) -> float:
    """Unbiased HSIC (Song et al. 2012, eq. 5) of two n x n matrices with zero diagonal whose
    only non-zero entries are at (rows, cols), valued kv and lv."""
    key = rows * n + cols
    order = key.argsort()
    key, kv_sorted, lv_sorted = key[order], kv[order], lv[order]
    # tr(K L) = sum_ij K_ij L_ji: look up L at the transposed position of every entry
    tkey = cols[order] * n + rows[order]
    pos = torch.searchsorted(key, tkey).clamp(max=max(len(key) - 1, 0))
    found = key[pos] == tkey
    trace = float((kv_sorted * torch.where(found, lv_sorted[pos], torch.zeros_like(lv_sorted))).sum())
    col_k = torch.zeros(n, dtype=torch.float64).index_add_(0, cols, kv)  # 1'K
    row_l = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, lv)  # L1
    one_kl = float(col_k @ row_l)  # 1'KL1
    total = trace + float(kv.sum()) * float(lv.sum()) / ((n - 1) * (n - 2)) - 2 * one_kl / (n - 2)
    return total / (n * (n - 3))


def cknna(
    A, B, k: int = 10, block_size: int = 1024, clip_quantile: float | None = None, clip_mode: str = "row-mean"
) -> float:
    """CKNNA (Huh et al. 2024): CKA of the cosine kernels kept only on mutual k-NN pairs.

    As platonic-rep computes it (``unbiased=True``): rows L2-normalised, K = A A^T and
    L = B B^T; for each item i its k nearest others in A and in B (self excluded); the mask keeps
    (i, j) when j is among both; score = HSIC(mK, mL) / sqrt(HSIC(m_A K, m_A K) HSIC(m_B L, m_B L))
    with the unbiased HSIC estimator (platonic-rep adds 1e-6 to that denominator; we do not).
    """
    A, B = _check_pair(A, B)
    n = A.shape[0]
    if n < 4:
        raise AlignmentInputError(f"cknna needs at least 4 items (unbiased HSIC); got {n}")
    if k < 2:
        raise AlignmentInputError(f"cknna needs k >= 2; got k={k}")
    _check_k(k, n)
    A, B = _clipped(A, B, clip_quantile, clip_mode)
    An = torch.nn.functional.normalize(A.double(), dim=1)
    Bn = torch.nn.functional.normalize(B.double(), dim=1)
    na, nb = knn_indices(An, k, block_size), knn_indices(Bn, k, block_size)
    item = torch.arange(n).unsqueeze(1).expand(n, k)

    def masked(X: Tensor, Y: Tensor, nx: Tensor, ny: Tensor) -> float:
        # kernel values at each item's k neighbours in X, kept where they are neighbours in Y
        # too; in row blocks, so at most (block, k, d) features are gathered at once
        keep = torch.zeros(n, k, dtype=torch.bool)
        kv, lv = torch.empty(n, k, dtype=torch.float64), torch.empty(n, k, dtype=torch.float64)
        for start in range(0, n, block_size):
            stop = min(n, start + block_size)
            a, b = nx[start:stop], ny[start:stop]
            keep[start:stop] = (a[:, :, None] == b[:, None, :]).any(-1)
            kv[start:stop] = torch.einsum("id,ijd->ij", X[start:stop], X[a])
            lv[start:stop] = torch.einsum("id,ijd->ij", Y[start:stop], Y[a])
        return _hsic_unbiased_sparse(item[keep], nx[keep], kv[keep], lv[keep], n)

    kl = masked(An, Bn, na, nb)
    kk = masked(An, An, na, na)
    ll = masked(Bn, Bn, nb, nb)
    return kl / max(kk * ll, 1e-300) ** 0.5


def _moments(X: Tensor, Y: Tensor, block_size: int):
    """Column sums and the Gram blocks X^T X, Y^T Y, X^T Y (float64), plus the per-row terms
    the unbiased estimator needs, accumulated over row blocks."""
    dx, dy = X.shape[1], Y.shape[1]
    sx, sy = torch.zeros(dx, dtype=torch.float64), torch.zeros(dy, dtype=torch.float64)
    xx = torch.zeros(dx, dx, dtype=torch.float64)
    yy = torch.zeros(dy, dy, dtype=torch.float64)
    xy = torch.zeros(dx, dy, dtype=torch.float64)
    for start in range(0, X.shape[0], block_size):
        xb, yb = X[start : start + block_size].double(), Y[start : start + block_size].double()
        sx += xb.sum(0)
        sy += yb.sum(0)
        xx += xb.T @ xb
        yy += yb.T @ yb
        xy += xb.T @ yb
    return sx, sy, xx, yy, xy


def _hsic_unbiased(X: Tensor, Y: Tensor, block_size: int) -> tuple[float, float, float]:
    """Unbiased HSIC(K, L), HSIC(K, K), HSIC(L, L) for linear kernels, without n x n."""
    n = X.shape[0]
    sx, sy, xx, yy, xy = _moments(X, Y, block_size)

    def terms(P: Tensor, Q: Tensor, pq: Tensor, sp: Tensor, sq: Tensor) -> float:
        # K~ = K with zero diagonal; tr(K~L~), 1'K~1, 1'L~1, 1'K~L~1 from row blocks
        tr, one_k, one_l, one_kl = float((pq * pq).sum()), 0.0, 0.0, 0.0
        diag_prod = 0.0
        for start in range(0, n, block_size):
            p, q = P[start : start + block_size].double(), Q[start : start + block_size].double()
            kd, ld = (p * p).sum(1), (q * q).sum(1)
            diag_prod += float((kd * ld).sum())
            k1, l1 = p @ sp - kd, q @ sq - ld  # (K~ 1)_i, (L~ 1)_i
            one_k += float(k1.sum())
            one_l += float(l1.sum())
            one_kl += float((k1 * l1).sum())
        tr -= diag_prod
        return (tr + one_k * one_l / ((n - 1) * (n - 2)) - 2 * one_kl / (n - 2)) / (n * (n - 3))

    return terms(X, Y, xy, sx, sy), terms(X, X, xx, sx, sx), terms(Y, Y, yy, sy, sy)


def cka(A, B, unbiased: bool = False, block_size: int = 4096) -> float:
    """Linear CKA between A (n, d_a) and B (n, d_b)."""
    A, B = _check_pair(A, B)
    n = A.shape[0]
    if unbiased:
        if n < 4:
            raise AlignmentInputError(f"unbiased CKA needs at least 4 items; got {n}")
        kl, kk, ll = _hsic_unbiased(A, B, block_size)
        return kl / max(kk * ll, 1e-300) ** 0.5
    sx, sy, xx, yy, xy = _moments(A, B, block_size)
    # centred cross-covariances: X_c^T Y_c = X^T Y - s_x s_y^T / n
    cxy = xy - torch.outer(sx, sy) / n
    cxx = xx - torch.outer(sx, sx) / n
    cyy = yy - torch.outer(sy, sy) / n
    num = float((cxy * cxy).sum())
    den = float((cxx * cxx).sum()) ** 0.5 * float((cyy * cyy).sum()) ** 0.5
    return num / max(den, 1e-300)


METRICS = ("mknn", "cka", "cka-unbiased", "cknna")


def score(
    A, B, metric: str = "mknn", k: int = 10, clip_quantile: float | None = None, clip_mode: str = "row-mean"
) -> float:
    """One alignment score by name: ``mknn``, ``cka``, ``cka-unbiased`` or ``cknna``.

    ``clip_quantile`` applies Huh et al.'s outlier clipping first (all metrics).
    """
    if metric not in METRICS:
        raise AlignmentInputError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    if metric in ("mknn", "cknna"):
        fn = mknn if metric == "mknn" else cknna
        return fn(A, B, k=k, clip_quantile=clip_quantile, clip_mode=clip_mode)
    A, B = _check_pair(A, B)
    A, B = _clipped(A, B, clip_quantile, clip_mode)
    return cka(A, B, unbiased=metric == "cka-unbiased")
