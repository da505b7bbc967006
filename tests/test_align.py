"""Blocked alignment metrics against naive full-matrix versions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esh.align import AlignmentInputError, cka, mknn


def naive_mknn(A, B, k):
    def knn(X):
        Xn = torch.nn.functional.normalize(torch.as_tensor(X, dtype=torch.float64), dim=1)
        s = Xn @ Xn.T
        s.fill_diagonal_(-float("inf"))
        return s.topk(k, dim=1).indices.tolist()

    return float(np.mean([len(set(a) & set(b)) for a, b in zip(knn(A), knn(B))]) / k)


def naive_cka(A, B, unbiased=False):
    X, Y = torch.as_tensor(A, dtype=torch.float64), torch.as_tensor(B, dtype=torch.float64)
    K, L = X @ X.T, Y @ Y.T
    n = K.shape[0]
    if not unbiased:
        H = torch.eye(n, dtype=torch.float64) - 1.0 / n
        hsic = lambda P, Q: float(((H @ P @ H) * (H @ Q @ H)).sum())  # noqa: E731
    else:

        def hsic(P, Q):
            P, Q = P.clone(), Q.clone()
            P.fill_diagonal_(0)
            Q.fill_diagonal_(0)
            one = torch.ones(n, 1, dtype=torch.float64)
            t = float((P * Q).sum()) + float(one.T @ P @ one) * float(one.T @ Q @ one) / ((n - 1) * (n - 2))
            t -= 2 * float(one.T @ P @ Q @ one) / (n - 2)
            return t / (n * (n - 3))

    return hsic(K, L) / (hsic(K, K) * hsic(L, L)) ** 0.5


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(300, 24, generator=g)
    B = A @ torch.randn(24, 16, generator=g) + 0.5 * torch.randn(300, 16, generator=g)
    return A, B


@pytest.mark.parametrize("block", [7, 64, 1024])
def test_mknn_equals_the_full_matrix_version(pair, block):
    A, B = pair
    assert mknn(A, B, k=10, block_size=block) == pytest.approx(naive_mknn(A, B, 10))


def test_mknn_of_identical_embeddings_is_one_and_of_unrelated_is_small(pair):
    A, _ = pair
    assert mknn(A, A, k=5) == 1.0
    noise = torch.randn(300, 24, generator=torch.Generator().manual_seed(9))
    assert mknn(A, noise, k=5) < 0.1


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("block", [5, 4096])
def test_cka_equals_the_full_matrix_version(pair, unbiased, block):
    A, B = pair
    assert cka(A, B, unbiased=unbiased, block_size=block) == pytest.approx(naive_cka(A, B, unbiased), rel=1e-9)


def test_cka_is_invariant_to_rotation_and_scale(pair):
    A, _ = pair
    Q, _ = torch.linalg.qr(torch.randn(24, 24, generator=torch.Generator().manual_seed(3)))
    assert cka(A, 3.0 * A @ Q) == pytest.approx(1.0, abs=1e-9)


def test_bad_input_is_a_clear_error(pair):
    A, B = pair
    with pytest.raises(AlignmentInputError, match="300 rows vs 299"):
        mknn(A, B[:299])
    bad = A.clone()
    bad[17, 3] = float("nan")
    with pytest.raises(AlignmentInputError, match="NaN or inf .*rows \\[17\\]"):
        cka(bad, B)
    with pytest.raises(AlignmentInputError, match="k must be between 1 and n - 1 = 299"):
        mknn(A, B, k=300)
    with pytest.raises(AlignmentInputError, match="2-D"):
        cka(A[0], B[0])


def test_cli_align_reads_npy_and_parquet(pair, tmp_path, capsys):
    from esh.cli import main

    A, B = pair
    np.save(tmp_path / "a.npy", A.numpy())
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"embedding": list(B.numpy())}), tmp_path / "b.parquet")
    assert (
        main(["align", str(tmp_path / "a.npy"), str(tmp_path / "b.parquet"), "--metric", "mknn", "cka", "--k", "5"])
        == 0
    )
    out = capsys.readouterr().out
    assert f"mknn: {mknn(A, B, k=5):.6f}" in out and f"cka: {cka(A, B):.6f}" in out
    assert main(["align", str(tmp_path / "a.npy"), str(tmp_path / "missing.npy")]) == 2


def test_layerwise_scores_best_pair_and_heatmap(tmp_path, capsys):
    from esh.align.layerwise import best_pair, layerwise
    from esh.cli import main

    g = torch.Generator().manual_seed(1)
    base = torch.randn(120, 8, generator=g)
    la = [torch.randn(120, 8, generator=g), base, torch.randn(120, 8, generator=g)]
    lb = [torch.randn(120, 6, generator=g), base @ torch.randn(8, 8, generator=g)]
    scores = layerwise(la, lb, "cka")
    assert scores.shape == (3, 2) and best_pair(scores)[:2] == (1, 1)
    np.savez(tmp_path / "a.npz", embedding=la[-1].numpy(), **{f"layer_{i}": t.numpy() for i, t in enumerate(la)})
    np.savez(tmp_path / "b.npz", embedding=lb[-1].numpy(), **{f"layer_{i}": t.numpy() for i, t in enumerate(lb)})
    png = tmp_path / "heat.png"
    args = ["align", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--layerwise", "--metric", "cka"]
    assert main([*args, "--heatmap", str(png)]) == 0
    assert "best A layer 1 / B layer 1" in capsys.readouterr().out and png.stat().st_size > 1000
