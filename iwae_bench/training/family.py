"""The importance-weighted family in one place: each objective's bound from the log-weights,
its weights d bound / d log w_i, and the weight its doubly reparameterized gradient puts on
the gradient arriving at each sample z_i.

For one example, log w_i (i = 1..k) from one forward pass; where an objective has groups, the
k = M K samples form M groups of K consecutive samples (group g holds samples gK .. gK + K - 1);
w~ is the softmax over the samples it names, held constant (no gradient through it).

    elbo, multi_sample_elbo  mean_i log w_i                                  (Kingma & Welling)
    iwae                     L_k = logsumexp_i log w_i - log k               (Burda et al. 2016)
    vr(alpha)                (logsumexp_i (1 - alpha) log w_i - log k) / (1 - alpha)
                             (Li & Turner 2016): alpha = 0 is L_k, alpha -> 1 the ELBO (alpha = 1
                             is taken as that limit); alpha < 0 gives values above L_k, not lower
                             bounds in general
    miwae(M, K)              (1/M) sum_g L_K(group g)                        (Rainforth et al. 2018)
    ciwae(beta)              beta mean_i log w_i + (1 - beta) L_k             (ibid.)
    piwae(M, K)              decoder from L_k over all M K samples, encoder from MIWAE(M, K)
                             on the same samples; its value is L_k           (ibid.)
    rws                      decoder from L_k (wake-theta); encoder from wake-phi,
                             sum_i w~_i grad_phi log q(z_i | x) with z_i held fixed (Bornschein &
                             Bengio 2015; Le et al. 2019); its value is L_k

Every bound above but PIWAE's encoder and RWS's wake-phi is one ``kernels.Reduction`` (scale s,
M groups, beta): (1/M) sum_g [(1 - beta)(lse_g(s log w) - log K)/s + beta mean_g log w], whose
weights are (1 - beta)/M w~_i + beta/k with w~ the softmax of s log w within i's group.

Estimators of the encoder's gradient (the decoder's never changes), for z_i = mu + sigma eps_i:
``iwae`` (the total gradient), ``stl`` (log q with q's parameters held fixed: the score term is
dropped) and ``dreg``, which turns the score term into a path term (Tucker, Lawson, Gu &
Maddison 2019). Derivation, for a bound L = sum_i c_i(log w) ... whose total encoder gradient
is sum_i c_i d log w_i / d phi (c_i = d L / d log w_i, constants of the forward pass):

    d log w_i / d phi = (d log w_i / d z_i)(d z_i / d phi) - d log q(z_i | x) / d phi |_z.

The score term's expectation is E[sum_i c_i d log q(z_i) / d phi], and for any function f of
z_i (and of the other samples) E_q[f(z_i) d log q(z_i)/d phi] = E_eps[(d f / d z_i)(d z_i / d phi)]
(the reparameterization of the same expectation, differentiated both ways). With f = c_i and
c_i depending on z_i only through log w_i: d c_i / d z_i = (d c_i / d log w_i)(d log w_i / d z_i).
So the DReG weight on the path gradient (d log w_i / d z_i)(d z_i / d phi) is

    omega_i = c_i - d c_i / d log w_i.

For c_i = w~_i (softmax of s log w within a group of the M): d w~_i / d log w_i = s w~_i (1 - w~_i),
giving omega = (1 - s) w~ + s w~^2 per group, times 1/M:

    iwae         w~_i^2                                  (s = 1, M = 1)
    vr(alpha)    alpha w~_i + (1 - alpha) w~_i^2          (s = 1 - alpha; w~^2 at alpha = 0,
                                                          1/k at alpha = 1, STL's weight)
    miwae, piwae (1/M) w~_i^2, w~ within i's group        (PIWAE's encoder is MIWAE's)
    ciwae        beta/k + (1 - beta) w~_i^2               (the mean's c_i = 1/k is constant)
    rws wake-phi w~_i - w~_i^2                            (c_i = w~_i on log q with z fixed, so
                                                          the wake-phi direction sum w~ d log q /
                                                          d phi becomes sum (w~ - w~^2) d log w /
                                                          d z d z / d phi: Tucker et al. sec. 4)

The elbo and multi_sample_elbo have c_i = 1/k constant, so their DReG is STL; it is refused by
name (use ``stl``).

How the loss computes them, in one backward pass. The surrogate is the decoder's bound (its
value is the objective's value) with log q's mu and logvar held fixed: autograd gives the
decoder its exact gradient, and the gradient arriving at z_i is c_dec,i (d log w_i / d z_i),
through the decoder and through log p(z) - log q(z) alike. A hook on z multiplies it by
f_i = omega_i / c_dec,i (``kernels.reweight``: f = (c + a u + b u^2) / (c2 + a2 u) with
u = exp(s log w_i - offset of i's group)), and where the estimator keeps a score term (the
total gradient of PIWAE, RWS's wake-phi) a surrogate sum_i coef_i log r(z_i) with z_i held fixed
(r = p(z)/q(z|x); its value is subtracted, so the loss value does not move) gives mu and logvar
their share. PIWAE is the one member whose encoder weight is not small where its decoder's is:
MIWAE weighs every group alike, w~_g,i / M, while the IWAE's w~_i = w~_g,i rho_g carries the
group's share rho_g = exp(lse_g - lse), which float32 holds only as a subnormal past about 87
nats below the best and as zero past 103 (MNIST's first epochs have such spreads); no hook can
rescale a gradient that has rounded to zero, and the old ratio exp(lse - lse_g) / M overflowed
past 88.7 nats (inf times 0: NaN). So PIWAE's decoder surrogate is linear in log w with
coefficients c_i = w~_g,i r_g, r_g = max(rho_g, 2^-50) (``PIWAE_FLOOR``), and its value is the
IWAE bound's: a floored group's change to the decoder's gradient is at most 2^-50 times that
group's own w~_g-weighted gradient sum_i w~_g,i d log w_i, far below float32's rounding of the
whole unless one group's gradient is 2^26 / M times the total; the hook's f_i = exp(-log r_g) / M
for the total gradient and STL and exp(log w_i - (lse_g + log r_g)) / M for DReG (w~_g,i^2 / M
over c_i) is at most 2^50 / M, finite, and exact. The tests put one group 35 and 300 nats below.
Stochastic layers: generalized DReG (Bauer & Mnih 2021). With two layers, q(h1, h2 | x) =
q(h1 | x; phi1) q(h2 | h1; phi2), drawn as h1 = T1(eps1; phi1), h2 = T2(h1, eps2; phi2), and
log w = log p(x, h1, h2) - log q(h1 | x) - log q(h2 | h1) a function of z = (h1, h2) and phi.
Its total derivative is the path term plus the score term of the joint q:

    d log w_i / d phi = (d_z log w_i)(d z_i / d phi) - d_phi log q(z_i) |_z

where d_z is the partial derivative at fixed phi: d_h1 log w_i includes -d_h1 log q(h2_i | h1_i)
through q(h2|h1)'s parameters mu2(h1), logvar2(h1) (h1 is that network's input, not a weight).
The identity above holds for the joint reparameterization z = T(eps; phi): with f = c_i,
E[c_i d_phi log q(z_i)] = E[(d c_i / d log w_i)(d_z log w_i)(d z_i / d phi)], so the DReG weight
omega_i = c_i - d c_i / d log w_i multiplies the whole path gradient, d z_i / d phi including
h2's dependence on phi1 through h1. What this asks of the surrogate: q's weights (phi1, phi2)
held fixed, but the path through the input of q(h2|h1) kept, i.e. mu2 and logvar2 recomputed
from the live h1 by the network with its weights detached (objectives.py ``held``; the model's
``Layer.posterior`` and ``given``). Detaching mu2 and logvar2 outright ("naive" DReG) drops
omega_i (-d_h1 log q(h2_i | h1_i))(d h1_i / d phi): its expectation vanishes when the weight
does not depend on h2 (E_{h2 ~ q(h2|h1)} d_h1 log q(h2 | h1) = 0) but not under omega_i, which
does. Measured (tests/test_two_layer.py): the generalized estimator agrees with the total
gradient, the naive one departs from it. STL on stochastic layers is the same held surrogate
without the reweighting; the score surrogates (PIWAE's total gradient, RWS's wake-phi) take
q(h2|h1)'s parameters from the detached h1 with live weights, the score term alone.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from kernels import IWAE, Reduction
from kernels.reweight import ReweightForm

OBJECTIVES = ("elbo", "multi_sample_elbo", "iwae", "vr", "miwae", "ciwae", "piwae", "rws")
ESTIMATORS = ("iwae", "stl", "dreg", "wake")
# PIWAE's floor on a group's share of the decoder's weight (module docstring): a floored group
# moves the decoder's gradient by at most PIWAE_FLOOR times its own w~_g-weighted gradient
PIWAE_FLOOR = 2.0 ** -50
GROUPED = ("miwae", "piwae")
ELBOS = ("elbo", "multi_sample_elbo")

# what each objective is for, in one line (the README's table, --help and reports read it)
PURPOSE = {
    "elbo": "the one-sample VAE bound",
    "multi_sample_elbo": "the average of k log-weights (k-sample VAE)",
    "iwae": "the IWAE bound L_k: tighter with k",
    "vr": "Renyi bound: alpha in (0, 1) between IWAE (0) and ELBO (1); alpha < 0 is not a lower bound",
    "miwae": "mean of M IWAE-K bounds: trades encoder SNR for tightness at a fixed budget M K",
    "ciwae": "beta ELBO + (1 - beta) IWAE on the same samples",
    "piwae": "decoder from IWAE-MK, encoder from MIWAE(M, K): the better of both",
    "rws": "reweighted wake-sleep: decoder from IWAE, encoder by wake-phi (needs no reparameterization)",
}


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class Objective:
    """One member of the family with its parameters: ``Objective("vr", alpha=0.5)``,
    ``Objective("miwae", M=8, K=8)`` (either of M, K may be left to follow from k),
    ``Objective("ciwae", beta=0.05)``. ``Objective.parse("miwae:8x8")`` reads the spelling
    the CLI, CSVs and reports use (``label``)."""

    name: str = "iwae"
    alpha: float | None = None
    M: int | None = None
    K: int | None = None
    beta: float | None = None

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.name!r}")
        given = {n: getattr(self, n) for n in ("alpha", "M", "K", "beta") if getattr(self, n) is not None}
        allowed = {"vr": ("alpha",), "ciwae": ("beta",), "miwae": ("M", "K"), "piwae": ("M", "K")}.get(self.name, ())
        for n in given:
            if n not in allowed:
                takes = f"takes {' and '.join(allowed)}" if allowed else "takes no parameter"
                raise ValueError(f"objective {self.name!r} {takes}; got {n}={given[n]!r}")
        if self.name == "vr":
            object.__setattr__(self, "alpha", _finite("alpha", 0.0 if self.alpha is None else self.alpha))
        if self.name == "ciwae":
            if self.beta is None:
                raise ValueError("objective 'ciwae' needs beta (in [0, 1]), e.g. beta=0.05")
            beta = _finite("beta", self.beta)
            if not 0.0 <= beta <= 1.0:
                raise ValueError(f"beta must lie in [0, 1], got {beta!r}")
            object.__setattr__(self, "beta", beta)
        if self.name in GROUPED:
            if self.M is None and self.K is None:
                raise ValueError(f"objective {self.name!r} needs its groups: M (how many) or K (samples "
                                 "in each), or both with M K = k")
            for n in ("M", "K"):
                if getattr(self, n) is not None:
                    _count(n, getattr(self, n))

    # ------------------------------------------------------------------ names

    @classmethod
    def parse(cls, spec: str) -> "Objective":
        """'iwae', 'elbo', 'multi_sample_elbo', 'rws', 'vr:0.5', 'ciwae:0.05', 'miwae:8x8',
        'piwae:4x16' (M x K) -> an Objective; a ValueError says what was expected."""
        name, _, arg = str(spec).strip().partition(":")
        try:
            if name == "vr":
                return cls("vr", alpha=float(arg) if arg else 0.0)
            if name == "ciwae":
                return cls("ciwae", beta=float(arg) if arg else None)
            if name in GROUPED:
                match = re.fullmatch(r"(\d+)x(\d+)", arg)
                if not match:
                    raise ValueError(f"{name} takes its groups as MxK, e.g. {name}:8x8")
                return cls(name, M=int(match[1]), K=int(match[2]))
            if arg:
                raise ValueError(f"{name} takes no parameter")
            return cls(name)
        except ValueError as error:
            raise ValueError(f"objective {spec!r}: {error}") from None

    @property
    def label(self) -> str:
        """The spelling ``parse`` reads: 'vr:0.5', 'miwae:8x8' (M x K), 'iwae'."""
        if self.name == "vr":
            return f"vr:{self.alpha:g}"
        if self.name == "ciwae":
            return f"ciwae:{self.beta:g}"
        if self.name in GROUPED:
            return f"{self.name}:{self.M or '?'}x{self.K or '?'}"
        return self.name

    @property
    def lower_bound(self) -> bool:
        """False only for VR with alpha < 0 (above L_k; not a lower bound in general)."""
        return not (self.name == "vr" and self.alpha < 0)

    # ------------------------------------------------------------------ the bound

    def groups(self, k: int) -> tuple[int, int]:
        """(M, K) for k samples; a ValueError names the group size that does not fit k."""
        if self.name not in GROUPED:
            return 1, k
        M, K = self.M, self.K
        if M is not None and K is not None and M * K != k:
            raise ValueError(f"{self.name} groups M x K = {M} x {K} = {M * K} samples, but k = {k}")
        if K is None:
            K, rest = divmod(k, M)
            if rest:
                raise ValueError(f"M = {M} groups do not divide k = {k}")
        elif k % K:
            raise ValueError(f"group size K = {K} does not divide k = {k}")
        return k // K, K

    def value(self, k: int) -> Reduction:
        """The reduction whose bound this objective reports and trains its decoder with."""
        if self.name in ELBOS:
            return Reduction(beta=1.0)
        if self.name == "vr":
            return Reduction(scale=1.0 - self.alpha)  # scale 0 (alpha = 1) becomes the mean
        if self.name == "miwae":
            return Reduction(groups=self.groups(k)[0])
        if self.name == "ciwae":
            return Reduction(beta=self.beta)
        if self.name == "piwae":
            self.groups(k)  # checked here, used by the encoder
        return IWAE

    def check(self, k: int, estimator: str, kl: str = "sampled") -> None:
        """Refuse, naming the argument, what does not apply at k samples."""
        if self.name == "elbo" and k != 1:
            raise ValueError(f"objective 'elbo' is the one-sample VAE bound and needs k = 1, got k = {k}; "
                             "use 'multi_sample_elbo' for the average over k samples")
        self.groups(k)
        check_estimator(self, estimator, kl)

    # ------------------------------------------------------------------ the encoder's gradient

    def encoder_terms(self, estimator: str, log_w: torch.Tensor):
        """What the loss adds to the decoder's surrogate for the encoder (module docstring):
        (form, offset [B, M'] or None, score [B, k] or None). ``form`` None: no hook on z;
        ``score`` None: no score surrogate. ``log_w`` [B, k] float32, detached."""
        B, k = log_w.shape
        if estimator == "iwae" and self.name not in ("piwae", "rws"):
            return None, None, None
        if estimator == "stl" and self.name != "piwae":
            return None, None, None
        if self.name == "piwae":
            M, K = self.groups(k)
            lse_g, log_r = self._piwae_groups(log_w)
            dead = torch.isneginf(lse_g)  # a group of no weight: offset -inf, u = 0 (not NaN)
            if estimator == "dreg":  # (1/M) w~_g^2 / (w~_g r_g) = exp(log w - (lse_g + log r_g)) / M
                return ReweightForm(a=1.0 / M), torch.where(dead, -math.inf, lse_g + log_r), None
            # total and stl: MIWAE's weight over the decoder's, (1/M) w~_g / (w~_g r_g) = exp(-log r_g) / M
            form, offset = ReweightForm(scale=0.0, a=1.0 / M), torch.where(dead, -math.inf, log_r)
            score = None
            if estimator == "iwae":  # MIWAE's own weights on log r(z) with z held fixed
                score = (torch.exp(log_w.view(B, M, K) - lse_g.unsqueeze(2)) / M).view(B, k)
            return form, offset, _no_nan(score, lse_g, M)
        if self.name == "rws":
            lse_all = torch.logsumexp(log_w, dim=1, keepdim=True)
            if estimator == "wake":  # no path through z; sum w~ d log q / d phi = -sum w~ d log r / d phi
                weights = torch.where(torch.isneginf(lse_all), 0.0, torch.exp(log_w - lse_all))
                return ReweightForm(a=0.0), lse_all, -weights
            return ReweightForm(c=1.0, a=-1.0), lse_all, None  # dreg: (w~ - w~^2) / w~
        # dreg of a single Reduction: omega / c = ((1 - b)(1 - s)/M u + (1 - b) s/M u^2 + b/k) / ((1 - b)/M u + b/k)
        reduction = self.value(k)
        s, M, beta = reduction.scale, reduction.groups, reduction.beta
        offset = torch.logsumexp(s * log_w.view(B, M, k // M), dim=2)
        if beta == 0.0:  # the 1/M cancels: f = (1 - s) + s u
            return ReweightForm(scale=s, c=1.0 - s, a=s), offset, None
        return (ReweightForm(scale=s, c=beta / k, a=(1 - beta) * (1 - s) / M, b=(1 - beta) * s / M,
                             c2=beta / k, a2=(1 - beta) / M), offset, None)


    def decoder_weights(self, log_w: torch.Tensor) -> torch.Tensor | None:
        """PIWAE's decoder coefficients c_i = w~_g,i r_g on log w_i, [B, k] (module docstring;
        zero for a sample or group of no weight); None for every other objective, whose
        decoder's surrogate is its own bound. ``log_w`` [B, k] float32, detached."""
        if self.name != "piwae":
            return None
        B, k = log_w.shape
        M, K = self.groups(k)
        lse_g, log_r = self._piwae_groups(log_w)
        coef = torch.exp(log_w.view(B, M, K) - (lse_g - log_r).unsqueeze(2)).view(B, k)
        return torch.where(torch.isneginf(log_w) | torch.isneginf(lse_g).repeat_interleave(K, 1), 0.0, coef)

    def _piwae_groups(self, log_w: torch.Tensor):
        """(lse_g [B, M], log r_g [B, M]): each group's logsumexp and the log of its share of the
        IWAE's weight, exp(lse_g - lse), floored at ``PIWAE_FLOOR``."""
        B, k = log_w.shape
        M, K = self.groups(k)
        lse_g = torch.logsumexp(log_w.view(B, M, K), dim=2)
        lse_all = torch.logsumexp(log_w, dim=1, keepdim=True)
        return lse_g, torch.clamp(lse_g - lse_all, min=math.log(PIWAE_FLOOR))


IWAE_OBJECTIVE = Objective()


def _no_nan(score, lse_g, M):
    """A group whose logsumexp is -inf has no weights: zeros, not exp(-inf + inf)."""
    if score is None:
        return None
    B, k = score.shape
    dead = torch.isneginf(lse_g).repeat_interleave(k // M, dim=1)
    return torch.where(dead, 0.0, score)


def check_estimator(objective: Objective, estimator: str, kl: str) -> None:
    """Refuse an estimator that does not apply to the objective, naming it."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    name = objective.name
    if kl == "analytic" and name not in ELBOS:
        raise ValueError(f"kl='analytic' applies to the ELBOs (elbo, multi_sample_elbo): objective "
                         f"{name!r} has no KL term to take in closed form; use kl='sampled'")
    if estimator == "dreg" and name in ELBOS:
        raise ValueError(f"estimator 'dreg' reweights an importance-weighted bound's gradient; objective "
                         f"{name!r} weighs every sample equally, where DReG reduces to 'stl': use estimator='stl'")
    if estimator == "stl" and kl == "analytic":
        raise ValueError("estimator 'stl' drops the score term of the sampled log q; with "
                         "kl='analytic' there is none to drop: use estimator='iwae'")
    if name == "rws" and estimator not in ("wake", "dreg"):
        raise ValueError(f"objective 'rws' trains its encoder by wake-phi: estimator must be 'wake' "
                         f"(or 'dreg', RWS-DReG), got {estimator!r}")
    if estimator == "wake" and name != "rws":
        raise ValueError(f"estimator 'wake' is reweighted wake-sleep's wake-phi update: it goes with "
                         f"objective='rws', not {name!r}")


def default_estimator(objective: Objective) -> str:
    return "wake" if objective.name == "rws" else "iwae"


def as_objective(objective, alpha=None, M=None, K=None, beta=None) -> Objective:
    """An Objective from a name and its keyword parameters, a 'vr:0.5' spelling, or itself."""
    if isinstance(objective, Objective):
        if any(v is not None for v in (alpha, M, K, beta)):
            raise ValueError("pass the objective's parameters inside the Objective, not beside it")
        return objective
    if not isinstance(objective, str):
        raise ValueError(f"objective must be a name or an Objective, got {type(objective).__name__}")
    if ":" in objective:
        if any(v is not None for v in (alpha, M, K, beta)):
            raise ValueError(f"objective {objective!r} already names its parameters")
        return Objective.parse(objective)
    return Objective(objective, alpha=alpha, M=M, K=K, beta=beta)


def torch_reduce(log_w: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """The reduction's bound [B] from log w [B, k] in stable PyTorch (autograd gives its
    weights): the torch backend's and the variants' form of ``kernels.Reduction``."""
    B, k = log_w.shape
    M = reduction.groups
    K = reduction.group_length(k)
    grouped = log_w.view(B, M, K)
    value = 0.0
    if reduction.beta < 1.0:
        s = reduction.scale
        # a group whose logsumexp is infinite (no weight at all; for s < 0 any zero weight) keeps
        # that value with no gradient, as in the kernels: torch's logsumexp backward would give
        # it exp(inf - inf) = NaN. The logsumexp is infinite exactly where the group's largest
        # entry is, so one max finds those groups. No data-dependent branch: torch.compile keeps
        # one graph.
        scaled = s * grouped
        top = scaled.detach().amax(dim=2)
        infinite = torch.isinf(top)
        lse = torch.where(infinite, top, torch.logsumexp(scaled.masked_fill(infinite.unsqueeze(2), 0.0), dim=2))
        value = (1.0 - reduction.beta) * ((lse - math.log(K)) / s)
    if reduction.linear:
        value = value + reduction.beta * grouped.mean(2)
    return value.mean(1)
