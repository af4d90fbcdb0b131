"""Metrics between sets of feature vectors: Frechet distance, a ridge map, retrieval recall."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _check_features(name: str, x: torch.Tensor, min_rows: int = 2) -> torch.Tensor:
    """``x`` (N, D) in float64, after checking its shape and that every value is finite.

    A tensor without values (the meta device) has its shape checked only.
    """
    if x.ndim != 2 or x.shape[0] < min_rows:
        raise ValueError(f"{name} must be (N, D) with N >= {min_rows}, found shape {tuple(x.shape)}")
    if x.device.type != "meta":
        bad_rows = int((~torch.isfinite(x)).any(1).sum())
        if bad_rows:
            raise ValueError(f"{name} must hold finite features, found {bad_rows} of its {x.shape[0]} rows "
                             "with NaN or infinite values")
    return x.double()


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` (N, D) and ``b`` (M, D).

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)``, in
    float64 with symmetric eigendecompositions (exact for the rank-deficient
    covariances of small samples).
    """
    a, b = _check_features("a", a), _check_features("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must share their width, found {a.shape[1]} and {b.shape[1]}")
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))  # (D, D), D = 1 too
    root_a = _psd_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    value = (mean_a - mean_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return float(value.clamp_min(0))


@dataclass
class RidgeMap:
    """A linear map ``y ~ (x - x_mean) / x_std @ weight + y_mean`` fitted by ridge regression.

    Attributes:
        weight: (D_in, D_out).
        x_mean: (D_in,); x_std: (D_in,); y_mean: (D_out,).
    """

    weight: torch.Tensor
    x_mean: torch.Tensor
    x_std: torch.Tensor
    y_mean: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, alpha: float) -> "RidgeMap":
        """Fit on pairs ``x`` (N, D_in) -> ``y`` (N, D_out) with penalty ``alpha``."""
        x, y = _check_features("x", x), _check_features("y", y)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must pair up row by row, found {x.shape[0]} and {y.shape[0]} rows")
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, found {alpha}")
        x_mean, x_std, y_mean = x.mean(0), x.std(0).clamp_min(1e-8), y.mean(0)
        xs = (x - x_mean) / x_std
        gram = xs.T @ xs + alpha * torch.eye(xs.shape[1], dtype=xs.dtype, device=xs.device)
        weight = torch.linalg.solve(gram, xs.T @ (y - y_mean))
        return cls(weight, x_mean, x_std, y_mean)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.double() - self.x_mean) / self.x_std) @ self.weight + self.y_mean


def retrieval_recall(queries: torch.Tensor, candidates: torch.Tensor,
                     ks: tuple[int, ...] = (1, 10)) -> dict[str, float]:
    """Recall@k of retrieving candidate ``i`` for query ``i`` by cosine similarity.

    Args:
        queries: (N, D), e.g. caption embeddings.
        candidates: (N, D), e.g. mapped image features; row ``i`` is query ``i``'s match.

    Returns:
        ``{"R@1": ..., "R@10": ...}``: the share of queries whose match ranks in the top k.
    """
    rank = retrieval_ranks(queries, candidates)
    return {f"R@{k}": float((rank < k).double().mean()) for k in ks}


#: Rounding errors of float64 within which two similarities count as a tie (`retrieval_ranks`).
TIE_TOLERANCE_ULPS = 16


def _unit_rows(features: torch.Tensor) -> torch.Tensor:
    """(N, D) rows divided by their own length, however short; a zero row stays zero."""
    return features / features.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(features.dtype).tiny)


def retrieval_ranks(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(N,) rank of candidate ``i`` for query ``i`` by cosine similarity: how many other candidates
    are at least as similar (0: it comes first). A tie counts against the match, so that a model
    whose images are all alike ranks its matches last, not first; similarities within
    `TIE_TOLERANCE_ULPS` rounding errors of the match's are ties (identical candidates can come
    out of the product a last bit apart). Shapes as in `retrieval_recall`.

    Raises:
        ValueError: a shape other than (N, D) for both, or a NaN or infinite feature.
    """
    queries, candidates = _check_features("queries", queries, 1), _check_features("candidates", candidates, 1)
    if queries.shape != candidates.shape:
        raise ValueError(f"queries and candidates must have one shape, found {tuple(queries.shape)} "
                         f"and {tuple(candidates.shape)}")
    similarity = _unit_rows(queries) @ _unit_rows(candidates).T  # (N, N): query i against candidate j
    match = similarity.diagonal()
    tolerance = TIE_TOLERANCE_ULPS * torch.finfo(similarity.dtype).eps * match.abs().clamp_min(1)
    return (similarity >= (match - tolerance).unsqueeze(1)).sum(1) - 1
