"""How far to trust an NLL estimate, from the same log-weights as the IWAE-k bound.

Both diagnostics take one test image's k log-weights log w_i (a row of log_w [B, k]) and need
no second pass over the data.

Jackknife variational inference (Nowozin 2018, "Debiasing evidence approximations: on
importance-weighted autoencoders and jackknife variational inference"). The IWAE bound L_k
has bias O(1/k) as an estimator of log p(x); the generalized jackknife of order m combines
the bounds on the subsets of k - j samples (j = 0..m) so that the bias terms up to order m
cancel (bias O(k^-(m+1))):

    JVI_m = sum_{j=0..m} c(k, m, j) Lbar_{k-j},
    c(k, m, j) = (-1)^j (k - j)^m / (j! (m - j)!),
    Lbar_{k-j} = mean over the C(k, j) subsets S of size k - j of (logsumexp_{i in S} log w_i - log(k - j)).

Order 1: k L_k - (k - 1) mean_i L_{k-1}^(-i); order 2: (k^2 L_k - 2 (k-1)^2 Lbar_{k-1} +
(k-2)^2 Lbar_{k-2}) / 2. The coefficients sum to 1. Unlike L_k, JVI is not a lower bound.

Computed in O(k) per image, in float64: with a_i = w_i / sum w (so log S cancels against
sum_j c_j = 1) and D_j = mean over the removed j-sets R of log(1 - sum_{i in R} a_i),

    JVI_m = L_k + sum_j c_j (D_j - log(1 - j / k))

(equal weights give D_j = log(1 - j/k) and JVI_m = L_k exactly). The coefficients reach
k^2 / 2 (1.25e7 at k = 5000) and the c_j D_j cancel to O(1), so each D_j is formed from
log1p of small numbers, never as a difference of logsumexps. Sorted descending, a_1 is the
only weight that can make 1 - a_i cancel (any other a_i <= 1/2, and a_i + a_j <= 2/3 for a
pair without the largest), so the pairs that remove it are taken in the log domain from the
logsumexp of the rest, and the others as log1p(-(a_i + a_j)). Of those, the pairs that
touch the next ``EXPLICIT`` weights are summed explicitly (O(k EXPLICIT)); every other weight
is below 1 / (EXPLICIT + 2), so their pairs' sum expands in the power sums P_n = sum a_i^n
of the remaining weights,

    sum_{i<j} log(1 - a_i - a_j) = -sum_n (1/n) (sum_{r=0..n} C(n, r) P_r P_{n-r} - 2^n P_n) / 2,

a series with ratio below 2 / (EXPLICIT + 2): ``TERMS`` terms leave a relative error under
1e-18.

PSIS k-hat (Vehtari, Simpson, Gelman, Yao & Gabry, "Pareto smoothed importance sampling"):
the M = ceil(min(k / 5, 3 sqrt(k))) largest weights, less the next one (the threshold u), are
fitted with a generalized Pareto distribution by Zhang & Stephens' (2009) empirical-Bayes
estimator, and the shape is pulled towards 0.5 by the paper's weakly informative prior
(worth 10 observations): k-hat = (M xi + 5) / (M + 10). k-hat estimates the tail index of
the weights' distribution: below 0.5 their variance is finite; above 0.7 the paper finds the
importance-sampling estimate unreliable at any practical sample size, so an NLL from such an
image is not to be trusted. Written here (about 30 lines) rather than imported: the maintained
implementations (arviz's ``psislw``, the ``loo`` R package) would bring arviz with its
xarray/scipy stack into a suite whose runtime needs are torch, triton, pandas and matplotlib;
``scipy.stats.genpareto.fit`` is maximum likelihood, not the estimator PSIS specifies. The
tests check it against samples of known generalized Pareto distributions and against an
importance sampler whose weights have a tail index known in closed form.
"""

from __future__ import annotations

import math

import torch

EXPLICIT = 14       # weights after the largest whose pairs are summed explicitly
TERMS = 20          # series terms for the rest: ratio < 2/16, (1/8)^20 ~ 1e-18
KHAT_UNRELIABLE = 0.7
PRIOR_WEIGHT = 10   # the weakly informative prior: 10 observations at shape 0.5
MIN_TAIL = 5        # fewer tail weights than this: no fit (NaN)
COLUMNS = ["jvi1_nll", "jvi2_nll", "khat_median", "khat_above"]  # what evaluate reports of them
ROWS = 16           # images at a time in the jackknife (its explicit pairs hold [ROWS, EXPLICIT, k])


# --------------------------------------------------------------------------- jackknife


def jvi_coefficients(k: int, order: int) -> list[float]:
    """c(k, m, j) = (-1)^j (k - j)^m / (j! (m - j)!), j = 0..m (Nowozin 2018, Sharot's)."""
    return [(-1) ** j * (k - j) ** order / (math.factorial(j) * math.factorial(order - j))
            for j in range(order + 1)]


def _log_rest(sorted_log_w: torch.Tensor, start: int, lse: torch.Tensor) -> torch.Tensor:
    """log of the share sum_{i >= start} a_i of the sorted weights, in the log domain."""
    return torch.logsumexp(sorted_log_w[:, start:], dim=1) - lse


def _pair_series(a: torch.Tensor) -> torch.Tensor:
    """sum_{i<j} log(1 - a_i - a_j) over the columns of a [B, n] (all a < 1/16), by the
    power sums (module docstring); as many terms as the largest a needs for (2 a)^N < 1e-18
    (``TERMS`` at most)."""
    powers = [torch.full_like(a[:, 0], float(a.shape[1]))]
    ratio = 2 * a.max().item() if a.numel() else 0.0     # below 1/8 by the sorting
    terms = min(TERMS, math.ceil(-18 * math.log(10) / math.log(ratio))) if ratio > 0 else 0
    term = torch.ones_like(a)
    for _ in range(terms):
        term = term * a
        powers.append(term.sum(dim=1))
    total = torch.zeros_like(powers[0])
    for n in range(1, terms + 1):
        cross = sum(math.comb(n, r) * powers[r] * powers[n - r] for r in range(n + 1))
        total = total - (cross - 2.0 ** n * powers[n]) / (2 * n)
    return total


def _removal_means(log_w: torch.Tensor, order: int) -> list[torch.Tensor]:
    """[D_0, ..., D_order]: D_j the mean over the removed j-sets of log(1 - their share)."""
    B, k = log_w.shape
    lw, _ = torch.sort(log_w.double(), dim=1, descending=True)
    lse = torch.logsumexp(lw, dim=1)
    a = torch.exp(lw - lse.unsqueeze(1))
    rest1 = _log_rest(lw, 1, lse)                 # share of all but the largest
    means = [torch.zeros(B, dtype=torch.float64, device=log_w.device)]
    if order >= 1:
        means.append((rest1 + torch.log1p(-a[:, 1:]).sum(dim=1)) / k)
    if order >= 2:
        # pairs with the largest: the second too (the rest's share), or another j >= 3
        with_top = _log_rest(lw, 2, lse) + (rest1.unsqueeze(1)
                                            + torch.log1p(-torch.exp(lw[:, 2:] - lse.unsqueeze(1)
                                                                     - rest1.unsqueeze(1)))).sum(dim=1)
        others = a[:, 1:]                          # pairs without the largest
        h = min(EXPLICIT, others.shape[1])
        explicit = torch.log1p(-(others[:, :h].unsqueeze(2) + others.unsqueeze(1)))   # [B, h, k-1]
        upper = torch.arange(others.shape[1], device=log_w.device) > torch.arange(h, device=log_w.device).unsqueeze(1)
        without_top = (explicit * upper).sum(dim=(1, 2)) + _pair_series(others[:, h:])
        means.append((with_top + without_top) / math.comb(k, 2))
    return means


def jvi(log_w: torch.Tensor, order: int) -> torch.Tensor:
    """The jackknife estimate of log p(x) of order 1 or 2 per row of log_w [B, k] (float64
    [B]); needs k > order. Module docstring: the definition and how it is computed."""
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    B, k = log_w.shape
    if k <= order:
        raise ValueError(f"the jackknife of order {order} needs k > {order} log-weights per image, got k = {k}")
    means = [torch.cat(parts) for parts in zip(*(_removal_means(rows, order) for rows in log_w.split(ROWS)))]
    bound = torch.logsumexp(log_w.double(), dim=1) - math.log(k)
    correction = sum(c * (d - math.log1p(-j / k)) for j, (c, d) in enumerate(zip(jvi_coefficients(k, order), means)))
    return bound + correction


# --------------------------------------------------------------------------- PSIS k-hat


def tail_length(k: int) -> int:
    """M = ceil(min(k / 5, 3 sqrt(k))), the PSIS paper's tail size (213 at k = 5000)."""
    return math.ceil(min(k / 5, 3 * math.sqrt(k)))


def gpd_shape(x: torch.Tensor, prior: bool = True) -> torch.Tensor:
    """The generalized Pareto shape xi fitted to the exceedances x [B, n] (each row >= 0) by
    Zhang & Stephens (2009), in Vehtari's sign (xi > 0: a heavy tail). For theta = -xi / sigma
    the shape that maximizes the likelihood is xi(theta) = mean log(1 - theta x), and the
    profile log-likelihood is n (log(-theta / xi(theta)) - xi(theta) - 1). Over the grid
    theta_j = 1/x_max + (1 - sqrt(m / (j - 1/2))) / (3 x_q), j = 1..m (m = 30 + floor(sqrt(n)),
    x_q the first quartile), the posterior weights are the softmax of the profile, theta-hat
    their weighted mean, and xi = mean log(1 - theta-hat x). ``prior``: then
    (n xi + 10 * 0.5) / (n + 10), PSIS's weakly informative prior. NaN for a row with no
    spread (x_max = 0: every weight of the tail equal, nothing to fit); +inf for a row whose
    first quartile is 0 while x_max is not (a quarter of the tail no heavier than the threshold
    in float64, 700 nats and more below the largest weight: the grid is undefined, and no
    finite shape describes a tail that spans that far)."""
    x, _ = torch.sort(x.double(), dim=1)
    B, n = x.shape
    m = 30 + math.isqrt(n)
    j = torch.arange(1, m + 1, dtype=torch.float64, device=x.device)
    quartile = x[:, max(int(n / 4 + 0.5), 1) - 1]
    theta = (1 / x[:, -1:]) + (1 - torch.sqrt(m / (j - 0.5))).unsqueeze(0) / (3 * quartile.unsqueeze(1))  # [B, m]
    xi_theta = torch.log1p(-theta.unsqueeze(2) * x.unsqueeze(1)).mean(dim=2)    # [B, m]
    profile = n * (torch.log(-theta / xi_theta) - xi_theta - 1)
    weights = torch.softmax(torch.nan_to_num(profile, nan=-math.inf), dim=1)
    theta_hat = (weights * theta).sum(dim=1, keepdim=True)
    xi = torch.log1p(-theta_hat * x).mean(dim=1)
    if prior:
        xi = (n * xi + PRIOR_WEIGHT * 0.5) / (n + PRIOR_WEIGHT)
    xi = torch.where(quartile > 0, xi, torch.inf)
    return torch.where(x[:, -1] > 0, xi, torch.nan)


def psis_khat(log_w: torch.Tensor) -> torch.Tensor:
    """PSIS k-hat per row of log_w [B, k] (float64 [B]): the generalized Pareto shape of the
    M largest weights above the next one (module docstring); NaN where M < 5 (k < 25)."""
    B, k = log_w.shape
    M = tail_length(k)
    if M < MIN_TAIL:
        return torch.full((B,), math.nan, dtype=torch.float64, device=log_w.device)
    top = torch.topk(log_w.double(), M + 1, dim=1).values          # descending
    scaled = torch.exp(top - top[:, :1])                            # the largest weight is 1
    return gpd_shape(scaled[:, :M] - scaled[:, M:], prior=True)
