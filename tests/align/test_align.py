"""Blocked alignment metrics against naive full-matrix versions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esh.align import AlignmentInputError, cka, cknna, clip_outliers, mknn, score


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


def naive_remove_outliers(feats, q, exact=False):
    # platonic-rep's remove_outliers, written out
    if exact:
        t = feats.reshape(-1).abs().sort().values[int(q * feats.numel())]
    else:
        t = torch.quantile(feats.abs().flatten(start_dim=1), q, dim=1).mean()
    return feats.clamp(-t, t)


def naive_cknna(A, B, k):
    # Huh et al.'s cknna(unbiased=True) on L2-normalised features, with full n x n matrices
    X = torch.nn.functional.normalize(torch.as_tensor(A, dtype=torch.float64), dim=1)
    Y = torch.nn.functional.normalize(torch.as_tensor(B, dtype=torch.float64), dim=1)
    K, L = X @ X.T, Y @ Y.T
    n = K.shape[0]

    def hsic_unbiased(P, Q):
        P, Q = P.clone().fill_diagonal_(0), Q.clone().fill_diagonal_(0)
        t = (P * Q.T).sum() + P.sum() * Q.sum() / ((n - 1) * (n - 2)) - 2 * (P @ Q).sum() / (n - 2)
        return t / (n * (n - 3))

    def similarity(P, Q):
        mp = torch.zeros(n, n, dtype=torch.float64).scatter_(1, P.clone().fill_diagonal_(-np.inf).topk(k).indices, 1)
        mq = torch.zeros(n, n, dtype=torch.float64).scatter_(1, Q.clone().fill_diagonal_(-np.inf).topk(k).indices, 1)
        m = mp * mq
        return hsic_unbiased(m * P, m * Q)

    return float(similarity(K, L) / torch.sqrt(similarity(K, K) * similarity(L, L)))


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


@pytest.mark.parametrize("k", [2, 5, 20])
@pytest.mark.parametrize("block", [13, 1024])
def test_cknna_equals_huh_et_als_full_matrix_version(pair, k, block):
    A, B = pair
    assert cknna(A, B, k=k, block_size=block) == pytest.approx(naive_cknna(A, B, k), rel=1e-9)


def test_cknna_of_identical_embeddings_is_one_and_rejects_k_below_two(pair):
    A, _ = pair
    assert cknna(A, A, k=5) == pytest.approx(1.0)
    with pytest.raises(AlignmentInputError, match="k >= 2"):
        cknna(A, A, k=1)


@pytest.mark.parametrize("mode,exact", [("row-mean", False), ("global", True)])
def test_outlier_clipping_is_platonic_reps_remove_outliers(mode, exact):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(200, 40, generator=g)
    X[:, 3] *= 50  # an "emergent outlier" feature
    torch.testing.assert_close(clip_outliers(X, 0.95, mode), naive_remove_outliers(X, 0.95, exact))


def test_clipped_mknn_is_huh_et_als_variant_and_can_change_the_score():
    g = torch.Generator().manual_seed(4)
    A = torch.randn(300, 32, generator=g)
    B = A + 0.3 * torch.randn(300, 32, generator=g)
    A[:, 0] += 40 * torch.randn(300, generator=g)  # one outlier dimension dominates A's cosine geometry
    clipped = mknn(A, B, k=10, clip_quantile=0.95)
    assert clipped == pytest.approx(naive_mknn(naive_remove_outliers(A, 0.95), naive_remove_outliers(B, 0.95), 10))
    assert clipped > mknn(A, B, k=10) + 0.1
    assert score(A, B, "mknn", k=10, clip_quantile=0.95) == clipped
    assert score(A, B, "cka") == cka(A, B)
    with pytest.raises(AlignmentInputError, match="metric must be one of"):
        score(A, B, "svcca")
    with pytest.raises(AlignmentInputError, match="quantile"):
        mknn(A, B, clip_quantile=1.5)


def test_cli_align_cknna_with_clipping(pair, tmp_path, capsys):
    from esh.cli import main

    A, B = pair
    np.save(tmp_path / "a.npy", A.numpy())
    np.save(tmp_path / "b.npy", B.numpy())
    args = ["align", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--metric", "cknna", "mknn", "--k", "5"]
    assert main([*args, "--clip-quantile", "0.95"]) == 0
    out = capsys.readouterr().out
    assert f"cknna: {cknna(A, B, k=5, clip_quantile=0.95):.6f}" in out
    assert f"mknn: {mknn(A, B, k=5, clip_quantile=0.95):.6f}" in out


def _align(argv, capsys) -> tuple[int, str]:
    from esh.cli import main

    code = main(["align", *argv])
    return code, capsys.readouterr().err.strip()


def test_cli_align_bad_files_are_one_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    good = tmp_path / "good.npy"
    np.save(good, rng.normal(size=(12, 4)).astype(np.float32))
    np.save(tmp_path / "words.npy", np.array([["a", "b"]] * 12))
    np.savez(tmp_path / "e.npz", embedding=rng.normal(size=(12, 4)))
    np.save(tmp_path / "cube.npy", np.zeros((12, 5, 4)))
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 junk")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 junk")
    cases = [
        ([str(tmp_path / "words.npy"), str(good)], "holds <U1 values; embeddings must be numbers"),
        ([str(tmp_path / "e.npz"), str(good), "--column", "nope"], "has no array 'nope'; it has embedding"),
        ([str(good), str(good), "--column", "x"], "--column picks an array"),
        ([str(tmp_path / "cube.npy"), str(good)], "2-D (items, features)"),
        ([str(tmp_path / "junk.npz"), str(good)], "not a readable .npz file"),
        ([str(tmp_path / "junk.parquet"), str(good)], "not a readable .parquet file"),
        ([str(tmp_path), str(good)], "not a regular file"),
        ([str(good), str(good), "--heatmap", "h.png"], "add --layerwise"),
        ([str(tmp_path / "e.npz"), str(tmp_path / "e.npz"), "--layerwise"], "no layer_i columns"),
    ]
    for argv, message in cases:
        code, err = _align(argv, capsys)
        assert code == 2 and message in err and len(err.splitlines()) == 1, (argv, err)


def test_cli_align_missing_parquet_column_is_one_line(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    pq.write_table(pa.table({"embedding": list(rows), "name": [f"n{i}" for i in range(12)]}), tmp_path / "e.parquet")
    code, err = _align([str(tmp_path / "e.parquet")] * 2 + ["--column", "vision"], capsys)
    assert code == 2 and "has no column 'vision'; it has embedding, name" in err
    code, err = _align([str(tmp_path / "e.parquet")] * 2 + ["--column", "name"], capsys)
    assert code == 2 and "embeddings must be numbers" in err and len(err.splitlines()) == 1


def test_fewer_than_two_items_is_a_clear_error():
    with pytest.raises(AlignmentInputError, match="at least 2 items"):
        mknn(np.zeros((1, 4)), np.zeros((1, 4)), k=1)


def test_string_arrays_are_refused_by_the_metrics():
    with pytest.raises(AlignmentInputError, match="numbers"):
        score(np.array([["a"]] * 5), np.ones((5, 1)), "cka")
