"""Redundancy-reduction terms: VICReg (Bardes, Ponce & LeCun 2022) and Barlow Twins (Zbontar et al. 2021).

Pure functions of projections ``(V, N, D)`` (V views, N samples, D dims). Pair-based parts average over
:func:`view_pairs` (global-global and global-local pairs, the multi-crop convention); per-view parts
average over all views.

Why custom autograd functions. The D x D matrices dominate the cost, and plain autograd spends three
matmuls on ``X^T X`` (forward, then one per operand) where two suffice, and materialises per-pair
gradients. Here:

* covariance: one ``Xc^T Xc`` per view forward and one ``Xc (C - diag C)`` backward;
* invariance: the pair sums forward, and the closed-form gradient ``2 (deg_v x_v - sum of neighbours)``
  backward, without a graph of per-pair differences;
* Barlow Twins, two exact routes to the same sums, chosen by their matmul work (:func:`barlow_route`):
  ``"pairs"`` forms each pair's ``D x D`` cross-correlation (one ``D x (k D)`` matmul per global view
  against all its k partners forward, two backward; ``3 P N D^2`` multiply-adds for P pairs);
  ``"gram"`` never forms it: ``||C_ab||_F^2 = <G_a, G_b> / N^2`` with the per-view ``N x N`` Gram matrix
  ``G_v = zn_v zn_v^T``, so V Gram matmuls forward and V backward (``2 V N^2 D``) serve all P pairs, and
  the diagonals ``C_ab,ii`` come elementwise. With many pairs or wide projectors (D >= N, the Barlow
  Twins paper's 8192-d head) the Gram route does a fraction of the work; with N >> D the pair route wins.
  Both write the batch-norm backward out.

Precision. Statistics, centring, normalisation, diagonals and every reduction are float32 (float64 for
float64 inputs). The D x D matmuls run in the projection dtype (bf16 under bf16 autocast or for bf16
inputs, as every other matmul of a mixed-precision step; fp32 otherwise): on CPUs with bf16 units that is
about four times the fp32 rate. The off-diagonal sums subtract the squared diagonal of the same matrix, so
the rounding of the diagonal cancels up to the last bits of the sum (about 1e-7 of a one-column
term in float32), and Barlow's on-diagonal term uses the float32 diagonal
``sum_n zn_a * zn_b / N`` computed elementwise (a bf16 ``C_ii`` near 1 would be off by up to 2e-3).
"""

from __future__ import annotations

from typing import Literal

import torch

from visreg_hub.errors import UserInputError

from . import _numerics as num
from ._numerics import all_views

__all__ = [
    "barlow_route",
    "barlow_twins_terms",
    "vicreg_covariance_loss",
    "vicreg_invariance_loss",
    "vicreg_variance_covariance",
    "vicreg_variance_loss",
    "view_pairs",
]


def view_pairs(num_global: int, num_views: int) -> list[tuple[int, int]]:
    """Unordered view pairs ``(a, b)``, ``a < b``, with ``a`` a global view: global-global and
    global-local pairs, no local-local pairs (the multi-crop convention)."""
    return [(a, b) for a in range(num_global) for b in range(a + 1, num_views)]


# ------------------------------------------------------------------------------------------- VICReg
def vicreg_variance_loss(z: torch.Tensor, *, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """VICReg variance term v(Z): mean over (views, dims) of ``relu(gamma - sqrt(Var_n(z) + eps))``.

    ``Var`` is the unbiased variance over the batch axis, as in the VICReg paper (eq. 1).

    Shape:
        ``z``: ``(..., N, D)``, N >= 2. Returns a 0-d float32 tensor (float64 for float64 ``z``).
    """
    num.check_samples(z, minimum=2)
    num.check_eps(eps)
    std = torch.sqrt(num.to_accumulation(z).var(dim=-2, correction=1) + eps)
    return torch.relu(gamma - std).mean()


class _CentredStatistics(torch.autograd.Function):
    """Per view: the unbiased variances ``(V, D)`` and ``sum_{i != j} C_ij^2`` with ``C = Xc^T Xc / (N - 1)``,
    from one centring, one matmul forward and one backward (of ``S = Xc / sqrt(N - 1)``, so ``C = S^T S``
    stays in float16's range)."""

    @staticmethod
    def forward(ctx, z, compute):
        n = z.shape[-2]
        with num.autocast_off(z.device.type):
            centred = num.to_accumulation(z)
            centred = centred - centred.mean(dim=-2, keepdim=True)
            variance = centred.square().sum(dim=-2) / (n - 1)
            # scaled by 1/sqrt(N - 1) before the cast: the matmul then forms C itself, whose entries are
            # covariances; Xc^T Xc is N - 1 times larger and overflowed float16 (65504) at N 256, std 16
            operand = (centred * (n - 1) ** -0.5).to(compute)
            cov = torch.matmul(operand.transpose(-1, -2), operand).to(centred.dtype)
            cov.diagonal(dim1=-2, dim2=-1).zero_()  # off-diagonal part; also what the backward needs
        ctx.save_for_backward(centred, operand, cov)
        ctx.z_dtype = z.dtype
        return variance, cov.square().sum(dim=(-2, -1))

    @staticmethod
    @num.first_order_only
    def backward(ctx, grad_variance, grad_off):
        centred, operand, off_cov = ctx.saved_tensors
        n = operand.shape[-2]
        with num.autocast_off(operand.device.type):
            # d/dXc sum_{i!=j} C_ij^2 = 4 Xc C_off / (N - 1) = 4 S C_off / sqrt(N - 1), S the scaled operand
            weights = (off_cov * (4.0 * (n - 1) ** -0.5 * grad_off).unsqueeze(-1).unsqueeze(-1)).to(
                operand.dtype
            )
            grad_centred = num.to_accumulation(torch.matmul(operand, weights))
            # d/dXc var = 2 Xc / (N - 1)
            grad_centred.addcmul_(centred, (2.0 / (n - 1) * grad_variance).unsqueeze(-2))
            # centring passes the gradient on minus its mean over N (zero up to rounding for both parts)
            grad_centred -= grad_centred.mean(dim=-2, keepdim=True)
        return grad_centred.to(ctx.z_dtype), None


def vicreg_variance_covariance(
    z: torch.Tensor, *, gamma: float = 1.0, eps: float = 1e-4, projection_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`vicreg_variance_loss` and :func:`vicreg_covariance_loss` of the same ``z`` from one centring
    (what :class:`~visreg_hub.losses.VICRegLoss` uses).

    Shape:
        ``z``: ``(..., N, D)``, N >= 2. Returns two 0-d float32 tensors (float64 for float64 ``z``).
    """
    num.check_samples(z, minimum=2)
    num.check_eps(eps)
    compute = num.resolve_projection_dtype(z, projection_dtype)
    variance, off = _CentredStatistics.apply(z, compute)
    return torch.relu(gamma - torch.sqrt(variance + eps)).mean(), (off / z.shape[-1]).mean()


def vicreg_covariance_loss(z: torch.Tensor, *, projection_dtype: torch.dtype | None = None) -> torch.Tensor:
    """VICReg covariance term c(Z): mean over views of ``sum_{i != j} C_ij^2 / D``, C the unbiased
    covariance over the batch axis (VICReg paper, eq. 3-4).

    The VICReg code sums this term over its two branches; the mean here is half that at V = 2, and
    :class:`~visreg_hub.losses.VICRegLoss` doubles it.

    Args:
        z: projections.
        projection_dtype: dtype of the ``D x D`` matmuls (default: autocast dtype, else ``z.dtype``).

    Shape:
        ``z``: ``(..., N, D)``, N >= 2. Returns a 0-d float32 tensor (float64 for float64 ``z``).
    """
    return vicreg_variance_covariance(z, projection_dtype=projection_dtype)[1]


class _PairInvariance(torch.autograd.Function):
    """``sum over view_pairs of sum_{n,d} (x_a - x_b)^2`` for views ``(V, N, D)``, closed-form backward."""

    @staticmethod
    def forward(ctx, views, num_global):
        upcast = num.to_accumulation(views)
        total = upcast.new_zeros(())
        for a in range(num_global):  # pairs (a, b > a): one broadcast difference per global view
            total = total + (upcast[a + 1 :] - upcast[a]).square().sum()
        ctx.num_global = num_global
        ctx.save_for_backward(views)
        return total

    @staticmethod
    @num.first_order_only
    def backward(ctx, grad):
        (views,) = ctx.saved_tensors
        g, v = ctx.num_global, views.shape[0]
        upcast = num.to_accumulation(views)
        factor = 2.0 * grad.to(upcast.dtype)
        out = torch.empty_like(upcast)
        # a global view pairs with every other view: sum_b (x_a - x_b) = V x_a - sum_all
        out[:g] = (v * upcast[:g] - upcast.sum(dim=0)) * factor
        # a local view pairs with every global view: sum_a (x_b - x_a) = G x_b - sum_global
        out[g:] = (g * upcast[g:] - upcast[:g].sum(dim=0)) * factor
        return out.to(views.dtype), None


def vicreg_invariance_loss(global_proj: torch.Tensor, local_proj: torch.Tensor | None = None) -> torch.Tensor:
    """VICReg invariance term s(Z, Z'): mean over :func:`view_pairs` of the mean squared difference of
    the two views' projections (VICReg paper, eq. 5). At two views this is ``F.mse_loss(z_a, z_b)``.

    Shape:
        ``global_proj``: ``(Vg, N, D)``; ``local_proj``: ``(Vl, N, D)`` or None. Returns a 0-d float32
        tensor (float64 for float64 inputs).
    """
    local_proj = num.check_views(global_proj, local_proj)  # (V, N, D) floats, not a 2-D batch
    if not global_proj.is_floating_point():
        raise UserInputError(f"global_proj must be a floating-point tensor, got dtype {global_proj.dtype}")
    views = all_views(global_proj, local_proj)
    num_pairs = len(view_pairs(global_proj.shape[0], views.shape[0]))
    if not num_pairs:
        raise UserInputError(f"VICReg needs at least two views, got global {tuple(global_proj.shape)}")
    total = _PairInvariance.apply(views, global_proj.shape[0])
    return total / (num_pairs * views[0].numel())


# ------------------------------------------------------------------------------------- Barlow Twins
def _batch_norm(upcast: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Barlow Twins' affine-free batch norm over N (biased variance): ``(zn, 1 / sqrt(var + eps))``.

    Shape: ``upcast`` ``(V, N, D)`` -> ``zn`` ``(V, N, D)``, ``inv_std`` ``(V, 1, D)``.
    """
    var, mean = torch.var_mean(upcast, dim=-2, correction=0, keepdim=True)
    inv_std = torch.rsqrt(var + eps)
    return (upcast - mean) * inv_std, inv_std


def _batch_norm_backward(
    grad_norm: torch.Tensor, normalised: torch.Tensor, inv_std: torch.Tensor
) -> torch.Tensor:
    """Gradient through :func:`_batch_norm`: ``inv_std * (g - mean_N g - zn * mean_N(g * zn))``."""
    grad_views = grad_norm - grad_norm.mean(dim=-2, keepdim=True)
    grad_views -= normalised * (grad_norm * normalised).mean(dim=-2, keepdim=True)
    return grad_views.mul_(inv_std)


class _BarlowTerms(torch.autograd.Function):
    """Sums over view pairs of ``sum_i (1 - C_ii)^2`` and ``sum_{i != j} C_ij^2``, ``C = zn_a^T zn_b / N``."""

    @staticmethod
    def forward(ctx, views, num_global, eps, compute):
        v, n, d = views.shape
        with num.autocast_off(views.device.type):
            upcast = num.to_accumulation(views)
            normalised, inv_std = _batch_norm(upcast, eps)
            operand = normalised.to(compute)
            on = upcast.new_zeros(())
            off = upcast.new_zeros(())
            corrs, diagonals = [], []
            for a in range(num_global):
                partners = v - a - 1
                if partners == 0:
                    continue
                # every partner b > a in one (D, N) @ (N, k D) matmul
                stacked = operand[a + 1 :].transpose(0, 1).reshape(n, partners * d)
                corr = torch.matmul(operand[a].t(), stacked).view(d, partners, d).to(upcast.dtype) / n
                rounded_diagonal = corr.diagonal(dim1=0, dim2=2)  # (k, D), the same rounding as corr
                # why: inductor miscompiled this function's backward when the diagonal saved for it was a
                # clone of a view of corr (torch 2.14, wrong on-diagonal gradients under torch.compile;
                # tests/losses/test_compile_gradients.py); the elementwise sum is exact and cheap (k N D)
                exact_diagonal = (normalised[a] * normalised[a + 1 :]).sum(dim=1) / n  # (k, D)
                on = on + (1.0 - exact_diagonal).square().sum()
                off = off + corr.square().sum() - rounded_diagonal.square().sum()
                corrs.append(corr)
                diagonals.append(exact_diagonal)
        ctx.save_for_backward(normalised, operand, inv_std, *corrs, *diagonals)
        ctx.num_global, ctx.views_dtype = num_global, views.dtype
        return on, off

    @staticmethod
    @num.first_order_only
    def backward(ctx, grad_on, grad_off):
        normalised, operand, inv_std, *saved = ctx.saved_tensors
        half = len(saved) // 2
        corrs, diagonals = saved[:half], saved[half:]
        v, n, d = normalised.shape
        grad_norm = torch.zeros_like(normalised)
        with num.autocast_off(normalised.device.type):
            for a, (corr, diagonal) in enumerate(zip(corrs, diagonals)):
                partners = v - a - 1
                # dL/dC: 2 C_ij off the diagonal (off term), -2 (1 - C_ii) on it (on term)
                grad_corr = corr * (2.0 * grad_off)
                grad_corr.diagonal(dim1=0, dim2=2).copy_((diagonal - 1.0) * (2.0 * grad_on))
                grad_corr = (grad_corr / n).to(operand.dtype).view(d, partners * d)
                stacked = operand[a + 1 :].transpose(0, 1).reshape(n, partners * d)
                grad_norm[a] += torch.matmul(stacked, grad_corr.t()).to(grad_norm.dtype)
                grad_partners = torch.matmul(operand[a], grad_corr).view(n, partners, d)
                grad_norm[a + 1 :] += grad_partners.transpose(0, 1).to(grad_norm.dtype)
            grad_views = _batch_norm_backward(grad_norm, normalised, inv_std)
        return grad_views.to(ctx.views_dtype), None, None, None


class _BarlowTermsGram(torch.autograd.Function):
    """The same two sums as :class:`_BarlowTerms` without any ``D x D`` matrix.

    With ``G_v = zn_v zn_v^T`` (N x N), ``S = sum_v G_v`` and ``S_g`` its sum over the global views:

    * ``sum_pairs ||C_ab||_F^2 = (sum_{a global} <G_a, S - G_a> + <S - S_g, S_g>) / (2 N^2)`` (each
      global-global pair appears twice in the first sum, each global-local pair once in each);
    * ``C_ab,ii = sum_n zn_a[n, i] zn_b[n, i] / N`` elementwise, exact in float32;
    * off = the first minus ``sum C_ab,ii^2``; on = ``sum (1 - C_ab,ii)^2``.

    Backward: ``d <G_a, H> / d zn_a = 2 H zn_a`` for symmetric H, where the partners' Gram sum is
    ``H_a = S - G_a`` for a global view and ``S_g`` for a local one (one ``N x N @ N x (k D)`` matmul for
    all local views); the diagonal terms are elementwise.
    """

    @staticmethod
    def forward(ctx, views, num_global, eps, compute):
        v, n = views.shape[:2]
        with num.autocast_off(views.device.type):
            upcast = num.to_accumulation(views)
            normalised, inv_std = _batch_norm(upcast, eps)
            operand = normalised.to(compute)
            global_grams = []  # kept for the backward's H_a = S - G_a
            global_total = total = None  # S_g, S (N, N), summed in place
            for a in range(v):
                gram = torch.matmul(operand[a], operand[a].t()).to(upcast.dtype)
                if a < num_global:
                    global_grams.append(gram)
                    global_total = gram.clone() if global_total is None else global_total.add_(gram)
                total = gram.clone() if total is None else total.add_(gram)
            frobenius = torch.sum((total - global_total) * global_total)  # <S_l, S_g>
            for gram in global_grams:
                frobenius = frobenius + torch.sum(gram * (total - gram))
            frobenius = frobenius / (2.0 * n * n)
            diagonals = torch.cat(  # (P, D) in view_pairs order
                [(normalised[a] * normalised[a + 1 :]).sum(dim=1) / n for a in range(num_global)]
            )
            on = (1.0 - diagonals).square().sum()
            off = frobenius - diagonals.square().sum()
        ctx.save_for_backward(normalised, operand, inv_std, total, global_total, diagonals, *global_grams)
        ctx.num_global, ctx.views_dtype = num_global, views.dtype
        return on, off

    @staticmethod
    @num.first_order_only
    def backward(ctx, grad_on, grad_off):
        normalised, operand, inv_std, total, global_total, diagonals, *global_grams = ctx.saved_tensors
        g = ctx.num_global
        v, n, d = normalised.shape
        with num.autocast_off(normalised.device.type):
            grad_norm = torch.empty_like(normalised)
            scale = 2.0 * grad_off / (n * n)
            for a in range(g):  # H_a = S - G_a
                partners = ((total - global_grams[a]) * scale).to(operand.dtype)
                grad_norm[a] = torch.matmul(partners, operand[a]).to(grad_norm.dtype)
            if v > g:  # H_b = S_g for every local view: one matmul for all of them
                local = operand[g:].transpose(0, 1).reshape(n, (v - g) * d)
                grad_local = torch.matmul((global_total * scale).to(operand.dtype), local)
                grad_norm[g:] = grad_local.view(n, v - g, d).transpose(0, 1).to(grad_norm.dtype)
            # diagonal terms: d/dzn_a[n, i] of (on, -C_ii^2) is coef_i zn_b[n, i], and symmetrically for b
            coefs = (2.0 / n) * ((diagonals - 1.0) * grad_on - diagonals * grad_off)  # (P, D)
            start = 0
            for a in range(g):
                k = v - a - 1
                coef = coefs[start : start + k].unsqueeze(1)  # (k, 1, D)
                grad_norm[a] += (coef * normalised[a + 1 :]).sum(dim=0)
                grad_norm[a + 1 :] += coef * normalised[a]
                start += k
            grad_views = _batch_norm_backward(grad_norm, normalised, inv_std)
        return grad_views.to(ctx.views_dtype), None, None, None


BarlowRoute = Literal["auto", "pairs", "gram"]


def check_barlow_route(route: str) -> str:
    """``route`` if it names a Barlow route, else a ValueError listing the choices."""
    if route not in ("auto", "pairs", "gram"):
        raise UserInputError(f"route must be 'auto', 'pairs' or 'gram', got {route!r}")
    return route


def barlow_route(num_global: int, num_views: int, n: int, d: int) -> Literal["pairs", "gram"]:
    """The cheaper exact route for Barlow Twins' cross-correlation sums at this shape.

    Multiply-adds of the matmuls, forward and backward: ``"pairs"`` ``3 P N D^2`` for the P
    :func:`view_pairs`, ``"gram"`` ``2 V N^2 D``. The Gram route also makes float32 passes over
    ``N x N`` buffers and its matmuls are narrower, measured on the CPU at 1.2x (fp32) to 1.5x (bf16) its
    multiply-add share, so it is chosen only below two thirds of the pair route's count: ``V N < P D``.
    E.g. two views at N 2048, D 8192 (the Barlow Twins paper's head): gram; two global + six local views
    at N 2048, D 2048: gram (V N = 16k < P D = 26k); four global + six local at N 1024, D 256: pairs.
    """
    pairs = len(view_pairs(num_global, num_views))
    return "gram" if num_views * n < pairs * d else "pairs"


def barlow_twins_terms(
    global_proj: torch.Tensor,
    local_proj: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
    projection_dtype: torch.dtype | None = None,
    route: BarlowRoute = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Barlow Twins L_BT (Zbontar et al. 2021, eq. 1): ``(sum_i (1 - C_ii)^2, sum_{i != j} C_ij^2)``
    averaged over :func:`view_pairs`.

    ``C = zn_a^T zn_b / N`` with ``zn = (z - mean_n) / sqrt(var_n + eps)`` (biased variance, the
    affine-free batch norm of the original). The loss is ``on_diagonal + off_diagonal_weight * off``.

    Args:
        global_proj, local_proj: projections of the global and (optional) local views.
        eps: added to the variance.
        projection_dtype: dtype of the cross-correlation matmuls (default: autocast dtype, else input).
        route: ``"pairs"`` (per-pair ``D x D`` matrices), ``"gram"`` (per-view ``N x N`` Gram matrices) or
            ``"auto"`` (the cheaper one by :func:`barlow_route`'s calibrated multiply-add count). Both
            compute the same sums; they differ in rounding only.

    Shape:
        ``global_proj``: ``(Vg, N, D)``; ``local_proj``: ``(Vl, N, D)`` or None. Returns two 0-d float32
        tensors (float64 for float64 inputs).
    """
    local_proj = num.check_views(global_proj, local_proj)
    num.check_eps(eps)
    views = all_views(global_proj, local_proj)
    num.check_samples(views, minimum=2)
    num_pairs = len(view_pairs(global_proj.shape[0], views.shape[0]))
    if not num_pairs:
        raise UserInputError(f"Barlow Twins needs at least two views, got global {tuple(global_proj.shape)}")
    num_global, v, n, d = global_proj.shape[0], *views.shape
    if check_barlow_route(route) == "auto":
        route = barlow_route(num_global, v, n, d)
    compute = num.resolve_projection_dtype(views, projection_dtype)
    terms = _BarlowTermsGram if route == "gram" else _BarlowTerms
    on, off = terms.apply(views, num_global, float(eps), compute)
    return on / num_pairs, off / num_pairs
