"""Pure tensor math shared by the methods (float64 where it matters, no model knowledge).

Linear weights follow ``nn.Linear``: W has shape (out, in) and y = x Wᵀ + b.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn


def fingerprint(tensor: torch.Tensor) -> str:
    """First 16 hex digits of the sha256 of integer ids: names calibration tokens and windows in
    reports and cache keys."""
    return hashlib.sha256(tensor.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]


# --- covariance spectra ---------------------------------------------------------------------------

def damped(c: torch.Tensor, damping: float) -> torch.Tensor:
    """C + damping · mean(diag C) · I (SliceGPT's relative damping keeps eigh well conditioned)."""
    c = c.double()
    return c + damping * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)


def eigenvalues(c: torch.Tensor, single: bool = False) -> torch.Tensor:
    """Eigenvalues of a symmetric matrix, descending, as float64 (the spectra reports show).

    On the CPU through SciPy's LAPACK (divide and conquer on the lower triangle): 1.3-1.9x faster
    than ``torch.linalg.eigvalsh`` at 1536 x 1536 on the 2-core machines this project measures on,
    where the spectra were a quarter of MoDeGPT's decompositions. ``single``: solve in float32 (1.5x
    faster again), for a statistic accumulated from float32 products ("mixed" :class:`Gram`). On the
    default model's MLP correlations (layers 0, 7, 15; spectra spanning 2e-5 to 7e-4 of λ_max) it moved
    the eigenvalues by at most 6e-7·λ_max, 5e-6 relative at the smallest tenth: the size of the mixed
    statistic's own difference from a float64 one there."""
    if c.device.type != "cpu":
        return torch.linalg.eigvalsh(c.float() if single else c.double()).double().flip(0)
    from scipy.linalg import eigh

    a = c.float().numpy() if single else c.double().numpy()
    return torch.from_numpy(eigh(a, eigvals_only=True, driver="evd", check_finite=False)).double().flip(0)


def pca(c: torch.Tensor, damping: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns, same order) of a symmetric matrix."""
    vals, vecs = torch.linalg.eigh(damped(c, damping) if damping else c.double())
    order = torch.argsort(vals, descending=True)
    return vals[order], vecs[:, order]


def sqrt_psd(c: torch.Tensor, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """C^{1/2} and C^{-1/2} of a PSD matrix (eigenvalues clipped at ``eps``)."""
    vals, vecs = torch.linalg.eigh(c.double())
    vals = vals.clamp_min(eps)
    root = vals.sqrt()
    inv = torch.where(root > 0, 1.0 / root, torch.zeros_like(root))
    return (vecs * root) @ vecs.T, (vecs * inv) @ vecs.T


SINGLE_MAX_COND = 2e4  # float32 solves only where cond(A) is provably below this: error ≲ cond·eps ≈ 1e-3


def shifted_cond_bound(trace: float, shift: float) -> float:
    """An upper bound on cond(C + shift·I) for a PSD C of trace ``trace``: its eigenvalues lie in
    [shift, trace + shift]."""
    return 1.0 + trace / shift if shift > 0 else float("inf")


def ridge_leverage(c: torch.Tensor, lam: float, single: bool = False) -> torch.Tensor:
    """Ridge leverage scores diag(C (C + λI)⁻¹) of a PSD correlation C (one per channel), float64.

    C (C + λI)⁻¹ = I − λ (C + λI)⁻¹, and C + λI is positive definite, so the scores come from its
    Cholesky factor: with C + λI = L Lᵀ, diag((C + λI)⁻¹) is the column sums of squares of L⁻¹, a
    triangular inverse (n³/3 flops; the whole inverse costs twice that). ``single``: in float32
    (about 1.8× faster at 1536 on the CPU) where the ridge bounds cond(C + λI) by
    :data:`SINGLE_MAX_COND` (:func:`shifted_cond_bound`); else in float64."""
    single = single and shifted_cond_bound(float(c.diagonal().double().sum()), lam) <= SINGLE_MAX_COND
    shifted = c.float().clone() if single else c.double().clone()
    shifted.diagonal().add_(lam)  # C + λI without an identity and a scaled copy
    factor, info = torch.linalg.cholesky_ex(shifted)
    if int(info):  # not positive definite in floating point (λ far below C's roundoff): solve generally
        shifted = shifted.double()
        return torch.linalg.solve(shifted, c.double()).diagonal().clone()
    del shifted
    return 1.0 - lam * triangular_inverse(factor).double().square().sum(0)


def triangular_inverse(lower: torch.Tensor) -> torch.Tensor:
    """L⁻¹ of a lower-triangular float32 or float64 matrix (LAPACK trtri on the CPU: 3-4x faster here
    than ``torch.cholesky_inverse``, which also forms L⁻ᵀL⁻¹)."""
    if lower.device.type != "cpu":
        eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
        return torch.linalg.solve_triangular(lower, eye, upper=False)
    from scipy.linalg import lapack

    trtri = lapack.strtri if lower.dtype == torch.float32 else lapack.dtrtri
    inverse, info = trtri(lower.numpy(), lower=1)
    if info:
        raise ValueError(f"singular triangular factor (LAPACK trtri info {info})")
    return torch.from_numpy(inverse).tril()


def solve_psd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A⁺B for a symmetric PSD A (in A's dtype): Cholesky when A is well enough conditioned, else a
    least-squares solve that truncates A's numerically null directions (dead channels, fewer tokens than
    channels). Cholesky is accepted when its smallest pivot is above n·eps of the largest, the
    rank threshold least squares itself uses; it is 2.3× faster at n = 4378 on one core."""
    factor, info = torch.linalg.cholesky_ex(a)
    if not int(info):
        pivots = factor.diagonal().square()
        if pivots.min() > pivots.max() * a.shape[0] * torch.finfo(a.dtype).eps:
            return torch.cholesky_solve(b, factor)
    return torch.linalg.lstsq(a, b).solution


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """‖approx − exact‖_F / ‖exact‖_F."""
    exact = exact.double()
    return float((approx.double() - exact).norm() / exact.norm().clamp_min(1e-30))


# --- rewriting linear layers ----------------------------------------------------------------------

def set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None,
               keep_bias: bool = True) -> None:
    """Replace a Linear's weight (and bias) in place, shapes may change; dtype/device kept."""
    dtype, device = linear.weight.dtype, linear.weight.device
    linear.weight = nn.Parameter(weight.to(device, dtype).contiguous(), requires_grad=False)
    linear.out_features, linear.in_features = weight.shape
    if linear.bias is not None and keep_bias:
        b = linear.bias if bias is None else bias
        linear.bias = nn.Parameter(b.to(device, dtype).contiguous(), requires_grad=False)


def scale_inputs(linear: nn.Linear, scale: torch.Tensor) -> None:
    """W ← W · diag(scale): folds a norm's per-feature scale into the layer that reads the norm."""
    set_linear(linear, linear.weight.double() * scale.double()[None, :])


def rotate_inputs(linear: nn.Linear, q: torch.Tensor) -> None:
    """W ← W Q: the layer now reads coordinates in the basis Q (columns), (in, d) -> in d."""
    set_linear(linear, linear.weight.double() @ q.double())


def rotate_outputs(linear: nn.Linear, q: torch.Tensor) -> None:
    """W ← Qᵀ W, b ← Qᵀ b: the layer now writes coordinates in the basis Q (out, d)."""
    q = q.double()
    bias = None if linear.bias is None else q.T @ linear.bias.double()
    set_linear(linear, q.T @ linear.weight.double(), bias)


def select_outputs(linear: nn.Linear, index: torch.Tensor) -> None:
    """Keep output features ``index`` (rows of W and entries of b)."""
    bias = None if linear.bias is None else linear.bias[index]
    set_linear(linear, linear.weight[index], bias)


def select_inputs(linear: nn.Linear, index: torch.Tensor) -> None:
    """Keep input features ``index`` (columns of W)."""
    set_linear(linear, linear.weight[:, index])


def new_linear(weight: torch.Tensor, like: torch.Tensor) -> nn.Linear:
    """A bias-free Linear holding ``weight`` (out, in) with the dtype/device of ``like``."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight.to(like.device, like.dtype).contiguous(), requires_grad=False)
    return layer


def round_down(x: float, multiple: int) -> int:
    return max(multiple, int(x) - int(x) % multiple) if multiple > 1 else max(1, int(x))


# --- structured decompositions (MoDeGPT, Olica) ------------------------------------------------


def nystrom_mlp(c: torch.Tensor, w_down: torch.Tensor, keep: int, ridge: float, shrinkage: float = 0.0,
                single: bool = False):
    """Channels to keep and the refitted down projection.

    c: (m, m) correlation of the intermediate activations; w_down: (D, m) as in nn.Linear.
    Returns (kept indices (keep,), new down weight (D, keep), leverage scores (m,), float64).

    The refit minimises ‖Z W_downᵀ − Z_S W'ᵀ‖²/n + μ‖W' − W_S‖² over n tokens, with
    μ = ``shrinkage`` · mean diag(SᵀCS): 0 is the paper's least squares, (SᵀCS)⁺ SᵀC W_downᵀ; μ > 0
    shrinks it toward dropping the channels (W_S: the kept columns of W_down as they are). The
    least-squares refit also fits the sampling noise of C, which a small calibration makes large
    (``bench.refit_shrinkage`` measures the held-out gain).

    single: the leverage scores and the refit in float32 where their shifts (λ, μ) bound the
    condition number by :data:`SINGLE_MAX_COND` (the default λ = mean eigenvalue and μ = 0.5 do:
    cond ≤ 1 + m/ridge, 1 + keep/shrinkage), else in float64. For statistics that are float32
    products anyway ("mixed" :class:`~compression.calibration.Gram`).
    """
    lam = ridge * float(c.diagonal().double().mean())
    scores = ridge_leverage(c, lam, single)
    index = torch.sort(torch.topk(scores, keep).indices).values
    trace = float(c.diagonal().double()[index].sum())  # of SᵀCS
    mu = shrinkage * trace / max(keep, 1)
    single = single and shifted_cond_bound(trace, mu) <= SINGLE_MAX_COND
    dtype = torch.float32 if single else torch.float64
    c, w = c.to(dtype), w_down.to(dtype)
    c_ss = c[index][:, index]                       # SᵀCS    (keep, keep), a copy
    rhs = c[index] @ w.T                            # SᵀC W_downᵀ   (keep, D)
    if mu > 0:
        c_ss.diagonal().add_(mu)
        rhs += mu * w[:, index].T
    refit = solve_psd(c_ss, rhs)                    # (keep, D)
    return index, refit.T.double(), scores


def rotary_pair_scores(q_diag: torch.Tensor, k_diag: torch.Tensor, groups: int) -> torch.Tensor:
    """CR scores of rotary pairs per kv group.

    q_diag: (H, hd) diagonal of each query head's output correlation; k_diag: (Hkv, hd).
    A pair (i, i + hd/2) has norm² C_ii + C_jj; its score is ‖k pair‖ · Σ_heads in group ‖q pair‖.
    Returns (Hkv, hd/2).
    """
    half = q_diag.shape[-1] // 2
    q_pair = (q_diag[:, :half] + q_diag[:, half:]).clamp_min(0).sqrt()
    k_pair = (k_diag[:, :half] + k_diag[:, half:]).clamp_min(0).sqrt()
    q_group = q_pair.view(k_diag.shape[0], groups, half).sum(1)
    return k_pair * q_group


def head_columns(pairs: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Column indices inside a head for kept pairs: [pairs, pairs + hd/2] (rotate-half order)."""
    return torch.cat([pairs, pairs + head_dim // 2])


def vo_decomposition(w_v: torch.Tensor, w_o: torch.Tensor, gram: torch.Tensor, keep: int,
                     eps: float = 1e-8):
    """Low-rank value-output of one kv group, weighted by the input correlation.

    w_v: (d_in, hd) value projection of the group; w_o: (hd, G·D) its query heads' output projections
    side by side; gram: (d_in, d_in). Minimises ‖C^{1/2}(W_V W_O − W_V' W_O')‖ with rank ``keep``,
    computed on the small factor: C^{1/2} W_V = U₁ S₁ V₁ᵀ (from eig of W_Vᵀ C W_V), then the SVD of
    S₁ V₁ᵀ W_O = U₂ S₂ V₂ᵀ; W_V' = W_V V₁ S₁⁻¹ U₂ₖ, W_O' = S₂ₖ V₂ₖᵀ.
    Returns (map M (hd, keep) with W_V' = W_V M, W_O' (keep, G·D), singular values S₂).
    """
    w_v, w_o = w_v.double(), w_o.double()
    vals, v1 = torch.linalg.eigh(w_v.T @ gram.double() @ w_v)
    s1 = vals.clamp_min(eps * vals.max().clamp_min(1e-30)).sqrt()
    u2, s2, v2t = torch.linalg.svd((s1[:, None] * v1.T) @ w_o, full_matrices=False)
    m = (v1 / s1[None, :]) @ u2[:, :keep]
    return m, s2[:keep, None] * v2t[:keep], s2
