"""BatchBALD (Kirsch, van Amersfoort & Gal, NeurIPS 2019) on MC-dropout samples.

BALD scores inputs one at a time, so a batch of the top BALD scores is full of near-duplicates.
BatchBALD picks the batch greedily by the mutual information between the *joint* labels of the
batch and the model parameters:

    a(x_1..x_k) = H(y_1..y_k) - sum_i E_w H(y_i | w),

with the T MC-dropout samples of :func:`dltest.inference.mc_predictions` standing in for the
posterior: p(y_1..y_k) = 1/T sum_t prod_i p_t(y_i). Each step adds the candidate that maximises a
of the batch so far plus itself (ties to the lower pool position).

The joint entropy is exact while the batch has at most ``joint_samples`` (M) label
configurations (C^k of them); beyond that, M configurations are drawn (stratified over the T
samples, from the selection's seeded generator, extended by one label per step) and
H(y_1..y_k, y) is estimated by importance sampling, -1/M sum_m sum_y p(c_m, y)/p(c_m) log p(c_m, y).
Configuration probabilities are kept rescaled per configuration (with their log scale carried
separately), so products of a thousand probabilities never underflow.

Cost: every step scores every candidate against every configuration, O(candidates x M x T x C).
The candidates are the ``candidate_factor`` x budget inputs of highest BALD (the rest could
only be picked after all of those), so the cost does not grow with the pool.

Memory: the working tensors are the (T, n, C) samples of the pool with their BALD scores, the
(candidates, T, C) samples and the per-chunk joint probabilities (chunk, M, C), chunk <= 256.
``max_memory_mb`` bounds them: the chunk of candidates scored at once is sized to fit, a bound too
small for even one candidate is an error that says what would fit, and the plan
(``planned_memory_mb``) is written into the selection's options.

Exact by construction: a candidate's joint entropy is computed with elementwise operations in a
fixed order (:func:`joint_entropies`), never a matrix product or reduction kernel whose grouping
may follow the shape, the threads or the CPU, and the lazy greedy applies its stopping rule one
candidate at a time (:func:`lazy_best`). The chunk size, hence ``max_memory_mb``, changes the
memory used and the speed, never a score bit or a pick.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from dltest.errors import DltestError
from dltest.progress import progress_bar
from dltest.selectors.base import Candidates, Selection, Selector, ordered_sum, register
from dltest.selectors.mc_dropout import bald_from_samples, mc_probabilities
from dltest.selectors.uncertainty import entropy

BYTES = 8  # float64
POOL_BYTES = 24  # per sampled probability of the pool: float32 samples, their float64 copy, x log x
TEMPORARIES = 5  # joint probabilities, one product, their x log x, its padded copy and pairwise sums: per candidate
LAZY_CHUNK = 256  # candidates re-scored at a time by the lazy greedy (fewer if the memory bound says so)
FIRST_CHUNK = 8  # the first chunk of each step; then doubled up to the chunk (the lazy greedy often stops early)


def memory_plan(pool: int, candidates: int, samples: int, classes: int, joint_samples: int,
                max_memory_mb: float) -> tuple[int, int]:
    """(chunk, bytes planned at most): how many candidates to score at once within the bound."""
    bound = int(max_memory_mb * 2**20)
    fixed = POOL_BYTES * pool * samples * classes + BYTES * (  # the pool's samples and their BALD
        2 * candidates * samples * classes  # the candidates' samples, and those re-scored
        + 2 * joint_samples * samples  # configuration probabilities, and their next version
        + 4 * candidates)  # conditional entropies, scores, masks
    per_candidate = TEMPORARIES * BYTES * joint_samples * classes
    chunk = (bound - fixed) // per_candidate
    if chunk < 1:
        need = (fixed + per_candidate) / 2**20
        raise DltestError(f"batchbald needs at least {need:.1f} MB for a pool of {pool}, {candidates} candidates, "
                          f"T={samples}, C={classes} "
                          f"and joint_samples={joint_samples}, above max_memory_mb={max_memory_mb:g}: raise "
                          "max_memory_mb, or lower joint_samples or candidate_factor")
    chunk = min(chunk, candidates, LAZY_CHUNK)
    return int(chunk), int(fixed + chunk * per_candidate)


def joint_entropies(configs: Tensor, log_scale: Tensor | None, probs: Tensor) -> Tensor:
    """H(y_batch, y_j) for every candidate j of ``probs`` (n, T, C).

    ``configs`` (M, T) holds p_t(configuration m) of the batch's label configurations. With
    ``log_scale`` None they are all C^k configurations (exact); otherwise M samples, each row
    rescaled by exp(-log_scale[m]) (importance-sampled estimate).

    Every candidate's value is computed by the same elementwise operations in the same order
    (samples t one after another, then :func:`ordered_sum` over classes and configurations),
    whichever candidates share the call: the chunking that bounds memory cannot change a bit of
    it, so neither can it change a selection.
    """
    m, t = configs.shape
    joint = configs[:, 0].view(1, m, 1) * probs[:, 0].unsqueeze(1)  # (n, M, C): p(c_m, y) summed over t
    for s in range(1, t):
        joint += configs[:, s].view(1, m, 1) * probs[:, s].unsqueeze(1)
    joint /= t
    plogp = ordered_sum(torch.special.xlogy(joint, joint), dim=2)  # (n, M); xlogy: one scalar log per element
    if log_scale is None:
        return 0.0 - ordered_sum(plogp, dim=1)
    q = configs.mean(dim=1)  # p(configuration m), up to its scale
    return -(ordered_sum(plogp / q, dim=1) + log_scale.sum()) / m


def lazy_best(order: Tensor, bound: Tensor, chunk: int, gain_of: Callable[[Tensor], Tensor],
              batch_entropy: float) -> tuple[float, int]:
    """(gain, position) of the best candidate by Minoux's lazy greedy, one candidate at a time.

    ``gain_of`` gives H(y_batch, y_j) - E H(y_j | w); ``bound`` holds each candidate's last marginal
    gain, that value less the batch's joint entropy ``batch_entropy`` at the time (updated in
    place). Marginal gains only shrink as the batch grows, so candidates are re-scored in ``order``
    (decreasing ``bound``) until the best fresh marginal gain beats the stale one of the next
    candidate; ties go to the lower position.

    Up to ``chunk`` candidates (8 first, then doubling) are scored per call of ``gain_of`` to save
    time, but the rule is applied to them one by one and the gains past the stopping point are
    dropped, so the outcome is the one of ``chunk=1``: the memory bound cannot change which
    candidates are re-scored.
    """
    best_gain, best = -math.inf, -1
    s, size = 0, min(FIRST_CHUNK, chunk)
    while s < len(order):
        fresh = order[s : s + size]
        gains = gain_of(fresh).tolist()
        following = bound[order[s + 1 : s + 1 + len(fresh)]].tolist()  # stale, read before any update
        following += [-math.inf] * (len(fresh) - len(following))
        for position, gain, next_bound in zip(fresh.tolist(), gains, following):
            bound[position] = gain - batch_entropy
            if gain > best_gain or (gain == best_gain and position < best):
                best_gain, best = gain, position
            if best_gain - batch_entropy > next_bound:
                return best_gain, best
        s, size = s + size, min(2 * size, chunk)  # most steps stop early: grow the chunk only as needed
    return best_gain, best


def batchbald(probs: Tensor, budget: int, generator: torch.Generator, joint_samples: int = 1000,
              chunk: int | None = None, progress: bool = False) -> tuple[Tensor, Tensor]:
    """(picks, scores): greedy BatchBALD over ``probs`` (n, T, C) MC-dropout samples; ``scores[k]`` is
    the mutual information of the first k + 1 picks (nats).

    Lazy greedy (Minoux): a candidate's gain can only shrink as the batch grows (the mutual
    information is submodular, Kirsch et al. 2019), so each step re-scores candidates in the order of
    their last gain (scored a chunk at a time, judged one at a time: :func:`lazy_best`), and stops
    as soon as the best fresh gain beats the stale gain of every candidate not re-scored. With the
    exact joint entropy this is the plain greedy; with sampled configurations, candidates whose last
    estimate is already below the best are not re-estimated.
    """
    probs = probs.double()
    n, t, c = probs.shape
    if budget > n:
        raise DltestError(f"batchbald budget {budget} exceeds the {n} candidates")
    chunk = min(chunk or n, LAZY_CHUNK)
    cond = entropy(probs).mean(dim=1)  # E_t H(y_j | w_t), (n,)
    bound = entropy(probs.mean(dim=1)) - cond  # the first marginal gain of every candidate: its BALD score
    configs = torch.ones((1, t), dtype=torch.float64, device=probs.device)
    log_scale: Tensor | None = None  # None: exact enumeration
    owner = torch.empty(0, dtype=torch.long)  # the sample t each drawn configuration is drawn under
    alive = torch.ones(n, dtype=torch.bool, device=probs.device)
    picks = torch.empty(budget, dtype=torch.long)
    scores = torch.empty(budget, dtype=torch.float64)
    batch_cond = 0.0
    batch_entropy = 0.0  # H(y_batch) of the batch so far (estimated once configurations are drawn)
    with progress_bar("batchbald", total=budget, enabled=progress) as advance:
        for k in range(budget):
            rows = torch.nonzero(alive).flatten()
            order = rows[torch.argsort(bound[rows], descending=True, stable=True)]  # ties: lower position first
            best_gain, j = lazy_best(order, bound, chunk,
                                     lambda rows: joint_entropies(configs, log_scale, probs[rows]) - cond[rows],
                                     batch_entropy)
            picks[k], scores[k] = j, best_gain - batch_cond
            batch_cond += float(cond[j])
            batch_entropy = best_gain + float(cond[j])  # H(y_batch) with j in the batch
            alive[j] = False
            advance(1)
            if k + 1 == budget:
                break
            p_j = probs[j]  # (T, C)
            if log_scale is None and configs.shape[0] * c <= joint_samples:
                configs = (configs.unsqueeze(1) * p_j.T.unsqueeze(0)).reshape(-1, t)  # (K * C, T)
                continue
            if log_scale is None:  # draw M configurations, M / T under each sample t, from the exact joint
                owner = torch.arange(joint_samples) % t
                per_sample = torch.multinomial(configs.T.cpu(), math.ceil(joint_samples / t), replacement=True,
                                               generator=generator)  # (T, M / T) configuration indices
                drawn = per_sample[owner, torch.arange(joint_samples) // t]
                configs = configs[drawn.to(configs.device)]
                log_scale = torch.zeros(joint_samples, dtype=torch.float64, device=probs.device)
            labels = torch.multinomial(p_j.cpu()[owner], 1, replacement=True, generator=generator).flatten()
            configs = configs * p_j[:, labels.to(probs.device)].T  # p_t(y_j = label_m) for every t
            scale = configs.max(dim=1).values
            configs = configs / scale.unsqueeze(1)
            log_scale = log_scale + torch.log(scale)
    return picks, scores


@register
class BatchBALD(Selector):
    name = "batchbald"
    summary = "BatchBALD: greedy batch maximising the joint mutual information over T MC-dropout samples"
    score_name = "mutual information of the batch up to this pick (nats)"
    needs_model = True
    needs_mc_samples = True

    def __init__(self, samples: int = 10, dropout: float = 0.1, joint_samples: int = 1000,
                 candidate_factor: float = 10, max_memory_mb: float = 1024):
        if int(samples) != samples or samples < 1:
            raise DltestError(f"samples (T) must be a whole number >= 1, not {samples}")
        if not 0.0 <= float(dropout) < 1.0:
            raise DltestError(f"dropout must lie in [0, 1), not {dropout}")
        if int(joint_samples) != joint_samples or joint_samples < 1:
            raise DltestError(f"joint_samples must be a whole number >= 1, not {joint_samples}")
        if not float(candidate_factor) >= 1:
            raise DltestError(f"candidate_factor must be >= 1, not {candidate_factor}")
        if not float(max_memory_mb) > 0:
            raise DltestError(f"max_memory_mb must be > 0, not {max_memory_mb}")
        self.samples = int(samples)
        self.dropout = float(dropout)
        self.joint_samples = int(joint_samples)
        self.candidate_factor = candidate_factor
        self.max_memory_mb = max_memory_mb
        self.used: dict[str, Any] = {}

    def options(self) -> dict[str, Any]:
        return {**super().options(), **self.used}

    def __call__(self, candidates: Candidates, budget: int, generator: torch.Generator) -> Selection:
        if candidates.model is None:
            raise DltestError("batchbald needs the model (MC dropout)")
        n = len(candidates)
        m = min(n, max(budget, math.ceil(self.candidate_factor * budget)))
        classes = candidates.outputs.logits.shape[1]
        chunk, planned = memory_plan(n, m, self.samples, classes, self.joint_samples, self.max_memory_mb)
        samples = mc_probabilities(candidates, self.samples, self.dropout, generator)  # (T, n, C)
        bald = bald_from_samples(samples)
        top = torch.sort(torch.argsort(bald, descending=True, stable=True)[:m]).values  # by position
        probs = samples[:, top].permute(1, 0, 2).to(candidates.device, torch.float64).contiguous()
        del samples
        self.used = {"candidates": m, "chunk": chunk, "planned_memory_mb": round(planned / 2**20, 1)}
        picks, scores = batchbald(probs, budget, generator, self.joint_samples, chunk, candidates.progress)
        return Selection(top[picks], scores)
