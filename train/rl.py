"""The math of PPO from AI feedback: small pure functions on padded response tensors.

Everything here works on a rollout laid out as ``(B, T)`` tensors over the *response*
tokens (the prompt and the video rows never appear): row b holds the tokens the policy
sampled for prompt b, right-padded to T. ``mask`` (B, T) is 1.0 on the valid tokens — from
the first response token up to and including the first EOS, or up to the length budget
when there is none — and 0.0 after; tokens after the first EOS are padding whatever their
ids (pad ≠ EOS is never assumed: :func:`response_mask` finds the EOS by id and the length
by count). Nothing here touches a model, a file or the process group; the recipe
(``train/ppo.py``) wires these into rollouts and updates, and ``tests/test_rl.py`` checks
each against values worked out by hand.

The pieces, in the order a PPO step uses them (the properties P1-P10 they guarantee are in
``docs/ppo.md``):

1. :func:`logprobs_from_logits` / :func:`entropy_from_logits` — one function for rollout,
   reference and update time, so the same temperature scaling and slicing apply everywhere.
2. :func:`response_mask` — valid tokens and whether the row ended with EOS.
3. :func:`shaped_scores` — the reward model's score with the no-EOS penalty and the
   optional length penalty.
4. :func:`kl_penalized_rewards` — per token ``-β·(logπ - logπ_ref)`` (k1), plus the score
   once, at the last valid token.
5. :func:`gae` — generalised advantage estimation backwards over the valid tokens with
   V = 0 after the last one; returns = advantages + values.
6. :func:`masked_whiten` — advantage whitening over valid tokens only (optionally summed
   over ranks so that it spans the full rollout batch); padding stays 0.
7. :func:`policy_loss` / :func:`value_loss` — the clipped PPO objectives, masked means.
8. :func:`minibatch_indices` — each sample exactly once per PPO epoch.
9. :class:`FixedKLController` / :class:`AdaptiveKLController` — β, fixed or steered to a
   KL target (Ziegler et al. 2019), with a state for checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

# Sums a small float64 tensor over ranks (e.g. a wrapper around all_reduce); None: one process.
AllReduce = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------ logprobs

def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(token) under ``softmax(logits / temperature)``, in float32.

    logits (B, T, V): the logits that *predict* each response token (already shifted by the
    caller: logits[:, t] predict tokens[:, t]); tokens (B, T) → (B, T). Padding positions get
    whatever the padded id's logprob is: mask them. E.g. logits [[0, ln 3]] (V=2), token 1,
    temperature 1 → log(3/4) = -0.2877; temperature 2 → log(√3/(1+√3)) = -0.4644.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = logits.float() / temperature
    # gather before the normaliser: log_softmax(x)[i] = x[i] - logsumexp(x), without a (B,T,V) output
    picked = scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scaled, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` per position: (B, T, V) → (B, T), float32.

    H = logsumexp(z) - Σ softmax(z)·z. E.g. uniform over V=4 → ln 4 = 1.3863. Logits of -inf
    (suppressed tokens) have probability 0 and add nothing.
    """
    scaled = logits.float() / temperature
    probs = torch.softmax(scaled, dim=-1)
    return torch.logsumexp(scaled, dim=-1) - (probs * scaled.masked_fill(probs == 0, 0.0)).sum(-1)


# ------------------------------------------------------------------------------ masks

def response_mask(tokens: torch.Tensor, eos_id: int, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid response tokens and whether each row ended with EOS.

    tokens (B, T) sampled ids; lengths (B,) how many of them were generated (the rest is
    padding). A token is valid when it lies before the generated length and at or before
    the first EOS. Returns ``(mask (B, T) float32, ended (B,) bool)``. E.g. eos=2,
    tokens [[5, 2, 7, 7]], lengths [4] → mask [[1, 1, 0, 0]], ended [True]; tokens
    [[5, 6, 7, 0]], lengths [3] → mask [[1, 1, 1, 0]], ended [False].
    """
    T = tokens.shape[1]
    positions = torch.arange(T, device=tokens.device).expand_as(tokens)
    generated = positions < lengths.to(tokens.device).unsqueeze(1)
    is_eos = (tokens == eos_id) & generated
    ended = is_eos.any(dim=1)
    first_eos = torch.where(ended, is_eos.float().argmax(dim=1), torch.full_like(lengths, T).to(tokens.device))
    valid = generated & (positions <= first_eos.unsqueeze(1))
    return valid.float(), ended


def only_valid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x where mask is 1, exactly 0 elsewhere — also where x is inf or NaN (a suppressed
    token's -inf logprob on padding must not turn a masked sum into NaN, as x·mask would)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last valid token, for either padding side: (B, T) → (B,) long.

    E.g. mask [[1, 1, 0], [0, 1, 1]] → [1, 2]. Every row needs a valid token: an empty row
    has no last token to read a score from, and is an error rather than a silent 0. (The one
    rule for PPO's rewards and the reward model's scored token.)
    """
    valid = mask.to(torch.long)
    if bool((valid.sum(dim=1) < 1).any()):
        raise ValueError("a row has no valid token (an empty sequence cannot be scored)")
    T = mask.shape[1]
    # the largest valid position: argmax over the position-weighted mask
    return (valid * torch.arange(1, T + 1, device=mask.device)).argmax(dim=1)


# ------------------------------------------------------------------------------ rewards

def shaped_scores(scores: torch.Tensor, ended: torch.Tensor, lengths: torch.Tensor, *,
                  no_eos_penalty: float | None, length_penalty: float = 0.0) -> torch.Tensor:
    """The sequence-level reward before the KL term: (B,) → (B,).

    A response that did not end with EOS within the length budget gets ``no_eos_penalty``
    in place of its score (None keeps the score); then ``length_penalty`` × valid tokens is
    subtracted. E.g. scores [1.0, 2.0], ended [True, False], lengths [3, 4],
    no_eos_penalty -8, length_penalty 0.1 → [0.7, -8.4].
    """
    out = scores.float()
    if no_eos_penalty is not None:
        out = torch.where(ended.to(out.device), out, torch.full_like(out, no_eos_penalty))
    if length_penalty:
        out = out - length_penalty * lengths.to(out)
    return out


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: ``-β·(logπ - logπ_ref)`` on every valid token, plus the score once,
    at the last valid token (the EOS). Padding gets 0.

    scores (B,), logprobs/ref_logprobs/mask (B, T) → ``(rewards (B, T), kl (B, T))`` where
    ``kl`` is the per-token k1 estimate ``(logπ - logπ_ref)·mask``. E.g. β=0.1, logπ
    [[-1, -2, -9]], logπ_ref [[-1.5, -1, -9]], mask [[1, 1, 0]], score [3] →
    kl [[0.5, -1, 0]], rewards [[-0.05, 0.1 + 3, 0]] = [[-0.05, 3.1, 0]].
    """
    kl = only_valid(logprobs.float() - ref_logprobs.float(), mask)
    rewards = -kl_coef * kl
    last = last_valid_index(mask)
    rewards = rewards.scatter_add(1, last.unsqueeze(1), scores.float().unsqueeze(1).to(rewards.device))
    return rewards, kl


# ------------------------------------------------------------------------------ masked statistics

def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return only_valid(x, mask).sum() if dim is None else only_valid(x, mask).sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over mask == 1 (all of it, or along ``dim``). E.g. x [[1, 2, 9]], mask
    [[1, 1, 0]] → 1.5. An all-zero mask gives 0, not NaN."""
    total = masked_sum(x, mask, dim)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return total / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True,
               all_reduce: AllReduce | None = None) -> torch.Tensor:
    """Variance of x over mask == 1 (a scalar); ``all_reduce`` spans every rank's tokens.

    E.g. x [[1, 2, 3, 9]], mask [[1, 1, 1, 0]] → 1.0 (unbiased), 2/3 (biased).
    """
    _, var = _masked_mean_var(x, mask, unbiased, all_reduce)
    return var.to(x.dtype)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  all_reduce: AllReduce | None = None) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` with mean and (unbiased) variance over valid tokens
    only; padding stays exactly 0. With ``shift_mean=False`` the mean is added back (only the
    scale changes). ``all_reduce`` makes the statistics span the whole batch over ranks.

    x, mask (B, T) → (B, T). E.g. x [[1, 2, 3, 9]], mask [[1, 1, 1, 0]] (mean 2, var 1) →
    [[-1, 0, 1, 0]] (to within eps).
    """
    mean, var = _masked_mean_var(x, mask, True, all_reduce)
    whitened = (x.double() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return only_valid(whitened, mask).to(x.dtype)


def _masked_mean_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool,
                     all_reduce: AllReduce | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) over valid tokens in float64, in two passes (over ranks with
    ``all_reduce``: first Σx and the count, then Σ(x - mean)²)."""
    x, mask = x.double(), mask.double()
    sums = _reduce(torch.stack([only_valid(x, mask).sum(), mask.sum()]), all_reduce)
    count = float(sums[1])
    mean = sums[0] / max(count, 1.0)
    centred = _reduce(only_valid((x - mean) ** 2, mask).sum().reshape(1), all_reduce)[0]
    if unbiased:
        if count < 2:
            raise ValueError("unbiased variance needs at least 2 valid tokens")
        return mean, centred / (count - 1)
    return mean, centred / max(count, 1.0)


def _reduce(t: torch.Tensor, all_reduce: AllReduce | None) -> torch.Tensor:
    return t if all_reduce is None else all_reduce(t)


# ------------------------------------------------------------------------------ advantages

def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, backwards over the valid tokens.

    rewards, values, mask (B, T) → ``(advantages (B, T), returns (B, T))``, 0 on padding.
    δ_t = r_t + γ·V_{t+1} - V_t with V = 0 after the last valid token;
    A_t = δ_t + γλ·A_{t+1}; returns = A + V.

    Hand-computed (γ=0.9, λ=0.5): r [[0, 1, 5]], V [[1, 2, 7]], mask [[1, 1, 0]] —
    δ_1 = 1 + 0.9·0 - 2 = -1, A_1 = -1; δ_0 = 0 + 0.9·2 - 1 = 0.8,
    A_0 = 0.8 + 0.45·(-1) = 0.35; advantages [[0.35, -1, 0]], returns [[1.35, 1, 0]].
    """
    rewards = only_valid(rewards.float(), mask)
    values = only_valid(values.float(), mask)
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        m = mask[:, t].float()
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * m
        # Invalid positions pass nothing backwards: V and A are 0 beyond the last valid token.
        next_advantage = advantages[:, t]
        next_value = values[:, t]
    returns = only_valid(advantages + values, mask)
    return advantages, returns


# ------------------------------------------------------------------------------ losses

@dataclass
class PolicyLoss:
    """What :func:`policy_loss` returns: the loss (with grad) and detached statistics."""

    loss: torch.Tensor
    clipfrac: torch.Tensor
    """Share of valid tokens where the clipped term was the one taken."""
    approx_kl: torch.Tensor
    """k3 estimate of KL(π_old ‖ π): mean of (r - 1) - log r over valid tokens."""
    ratio: torch.Tensor
    """Mean probability ratio r = π/π_old over valid tokens."""


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float) -> PolicyLoss:
    """The clipped PPO surrogate: masked mean of ``max(-A·r, -A·clip(r, 1-ε, 1+ε))``.

    logprobs (B, T) with grad; old_logprobs, advantages, mask (B, T). E.g. ε=0.2, ratio
    [1.5, 0.5] (log 1.5, log 0.5), A [1, 1]: max(-1.5, -1.2) = -1.2 and
    max(-0.5, -0.8) = -0.5 → loss -0.85, clipfrac 0.5 (only the first was clipped).
    """
    log_ratio = only_valid(logprobs.float() - old_logprobs.float(), mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
        mean_ratio = masked_mean(ratio, mask)
    return PolicyLoss(loss=loss, clipfrac=clipfrac, approx_kl=approx_kl, ratio=mean_ratio)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped value loss: masked mean of ``½·max((V - R)², (clip(V, V_old ± ε_v) - R)²)``.

    values (B, T) with grad; old_values, returns, mask (B, T) → ``(loss, clipfrac)``. E.g.
    ε_v=0.2, V_old 1, R 2: V 1.5 → clipped to 1.2, ½·max(0.25, 0.64) = 0.32 (clipped);
    V 2.1 → clipped to 1.2, ½·max(0.01, 0.64) = 0.32 (clipped); V 1.1 → ½·0.81 = 0.405.
    """
    values = values.float()
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_err > unclipped_err).float(), mask)
    return loss, clipfrac


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over valid tokens (1: the value fits; ≤ 0: no better than a
    constant). NaN when the returns do not vary."""
    var_returns = float(masked_var(returns, mask, unbiased=False))
    if var_returns == 0:
        return math.nan
    return 1.0 - float(masked_var(returns - values, mask, unbiased=False)) / var_returns


# ------------------------------------------------------------------------------ minibatches

def minibatch_indices(n: int, minibatch_size: int, seed: int) -> list[torch.Tensor]:
    """A seeded permutation of ``range(n)`` cut into minibatches: each sample exactly once.

    ``n`` must be a multiple of ``minibatch_size`` (so every minibatch is full and no
    sample is left out or repeated). The permutation depends on ``seed`` only, never on the
    global RNG, so a resumed run draws the same minibatches.
    """
    if minibatch_size < 1 or n % minibatch_size:
        raise ValueError(f"{n} samples do not split into minibatches of {minibatch_size}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    return list(order.split(minibatch_size))


# ------------------------------------------------------------------------------ KL coefficient

@dataclass
class FixedKLController:
    """β stays at ``value``."""

    value: float
    kind: Literal["fixed"] = "fixed"

    def update(self, kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float | str]:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, self.kind)
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """β steered towards a KL target (Ziegler et al. 2019, "Fine-Tuning Language Models
    from Human Preferences"): e = clip(KL / target - 1, -0.2, 0.2); β ← β·(1 + e·n/horizon),
    where KL is the mean per-sequence KL of the last rollout and n its sample count.

    E.g. β 0.1, target 6, horizon 10000, KL 12, n 256 → e 0.2, β 0.1·(1 + 0.2·0.0256) = 0.1005.
    """

    value: float
    target: float
    horizon: float
    kind: Literal["adaptive"] = "adaptive"

    def update(self, kl: float, n_steps: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float | str]:
        return {"kind": self.kind, "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, self.kind)
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), float(state["horizon"])


def _check_kind(state: dict, kind: str) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"KL controller state is {state.get('kind')!r}, this controller is {kind!r}")


def make_kl_controller(kl_coef: float, target: float | None,
                       horizon: float) -> FixedKLController | AdaptiveKLController:
    """Fixed β when ``target`` is None, else adaptive from ``kl_coef`` towards ``target``."""
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if target is None:
        return FixedKLController(kl_coef)
    if target <= 0 or horizon <= 0:
        raise ValueError("the adaptive KL controller needs target > 0 and horizon > 0")
    return AdaptiveKLController(kl_coef, target, horizon)


# ------------------------------------------------------------------------------ helpers for the recipe

def sequence_kl(kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence KL estimate: Σ_t kl·mask, (B, T) → (B,)."""
    return only_valid(kl, mask).sum(dim=1)
