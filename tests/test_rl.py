"""train/rl.py against values worked out by hand, and the invariances of correct PPO.

Each test names the statement of docs/ppo.md (P1-P10) it checks (the model-level
halves of statements 2, 3, 4, 9 and 10 are in tests/test_ppo.py).
"""

import math
import threading

import pytest
import torch

from train import rl


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------------------- logprobs (P2)

def test_logprobs_hand_computed_with_temperature():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    tokens = torch.tensor([[1]])
    assert rl.logprobs_from_logits(logits, tokens).item() == pytest.approx(math.log(3 / 4), abs=1e-6)
    # temperature 2: softmax([0, ln3 / 2]) = [1, √3] / (1 + √3)
    expected = math.log(math.sqrt(3) / (1 + math.sqrt(3)))
    assert rl.logprobs_from_logits(logits, tokens, temperature=2.0).item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError):
        rl.logprobs_from_logits(logits, tokens, temperature=0.0)


def test_logprobs_equal_log_softmax_gather():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(rl.logprobs_from_logits(logits, tokens, 0.7), expected)


def test_entropy_uniform_and_one_hot():
    uniform = torch.zeros(1, 2, 4)
    torch.testing.assert_close(rl.entropy_from_logits(uniform), torch.full((1, 2), math.log(4)))
    peaked = torch.tensor([[[100.0, 0.0, 0.0]]])
    assert rl.entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)
    # a suppressed token (-inf) adds nothing: uniform over the other two
    suppressed = torch.tensor([[[0.0, float("-inf"), 0.0]]])
    assert rl.entropy_from_logits(suppressed).item() == pytest.approx(math.log(2), abs=1e-6)
    assert rl.logprobs_from_logits(suppressed, torch.tensor([[2]])).item() == pytest.approx(-math.log(2))


# ---------------------------------------------------------------------------- masks (P4, P5)

def test_response_mask_stops_at_first_eos_and_generated_length():
    eos = 2
    tokens = torch.tensor([[5, 2, 7, 2],    # EOS at 1: tokens after it are padding whatever they are
                           [5, 6, 7, 0],    # 3 generated, no EOS
                           [2, 9, 9, 9],    # EOS first
                           [5, 6, 7, 8]])   # full budget, no EOS
    lengths = torch.tensor([4, 3, 4, 4])
    mask, ended = rl.response_mask(tokens, eos, lengths)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert ended.tolist() == [True, False, True, False]


def test_response_mask_pad_is_not_eos():
    # pad id 0 after the generated length is never taken for an EOS, even if it equals another id
    tokens = torch.tensor([[5, 6, 2, 2]])
    mask, ended = rl.response_mask(tokens, eos_id=2, lengths=torch.tensor([2]))
    assert mask.tolist() == [[1, 1, 0, 0]] and ended.tolist() == [False]


def test_padding_holding_inf_or_nan_stays_out_of_every_masked_result():
    mask = t([[1, 1, 0]])
    bad = t([[-1.0, -2.0, float("-inf")]])
    other = t([[-1.5, -1.0, float("nan")]])
    assert rl.masked_mean(bad, mask).item() == -1.5
    rewards, kl = rl.kl_penalized_rewards(t([1.0]), bad, other, mask, 0.1)
    assert bool(torch.isfinite(rewards).all()) and bool(torch.isfinite(kl).all())
    adv, ret = rl.gae(rewards, other, mask, 1.0, 1.0)
    assert bool(torch.isfinite(adv).all()) and adv[0, 2] == 0
    out = rl.policy_loss(bad, other.nan_to_num(), adv, mask, 0.2)
    assert bool(torch.isfinite(out.loss))


def test_last_valid_index():
    mask = t([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert rl.last_valid_index(mask).tolist() == [1, 3, 0]
    with pytest.raises(ValueError):
        rl.last_valid_index(t([[0, 0]]))


def test_shaped_scores_penalise_missing_eos_and_length():
    scores = t([1.0, 2.0])
    out = rl.shaped_scores(scores, torch.tensor([True, False]), torch.tensor([3, 4]),
                           no_eos_penalty=-8.0, length_penalty=0.1)
    torch.testing.assert_close(out, t([0.7, -8.4]))
    kept = rl.shaped_scores(scores, torch.tensor([True, False]), torch.tensor([3, 4]), no_eos_penalty=None)
    torch.testing.assert_close(kept, scores)


# ---------------------------------------------------------------------------- rewards (P1)

def test_kl_penalized_rewards_hand_computed():
    rewards, kl = rl.kl_penalized_rewards(
        scores=t([3.0]), logprobs=t([[-1.0, -2.0, -9.0]]), ref_logprobs=t([[-1.5, -1.0, -9.0]]),
        mask=t([[1, 1, 0]]), kl_coef=0.1)
    torch.testing.assert_close(kl, t([[0.5, -1.0, 0.0]]))
    torch.testing.assert_close(rewards, t([[-0.05, 3.1, 0.0]]))


def test_score_added_once_at_last_valid_token_per_row():
    scores = t([1.0, -2.0, 5.0])
    logprobs = torch.zeros(3, 4)
    mask = t([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]])
    rewards, _ = rl.kl_penalized_rewards(scores, logprobs, logprobs, mask, kl_coef=0.1)
    expected = torch.zeros(3, 4)
    expected[0, 3], expected[1, 0], expected[2, 1] = 1.0, -2.0, 5.0
    torch.testing.assert_close(rewards, expected)
    # the total reward of a row is score - β·Σ kl
    lp, ref = torch.randn(3, 4), torch.randn(3, 4)
    rewards, kl = rl.kl_penalized_rewards(scores, lp, ref, mask, kl_coef=0.3)
    torch.testing.assert_close(rewards.sum(1), scores - 0.3 * ((lp - ref) * mask).sum(1))
    assert bool((rewards[mask == 0] == 0).all())


# ---------------------------------------------------------------------------- masked statistics (P7)

def test_masked_mean_var_whiten_hand_computed():
    x, mask = t([[1, 2, 3, 9]]), t([[1, 1, 1, 0]])
    assert rl.masked_mean(x, mask).item() == pytest.approx(2.0)
    assert rl.masked_var(x, mask).item() == pytest.approx(1.0)
    assert rl.masked_var(x, mask, unbiased=False).item() == pytest.approx(2 / 3)
    torch.testing.assert_close(rl.masked_whiten(x, mask), t([[-1, 0, 1, 0]]), atol=1e-6, rtol=0)
    # shift_mean=False keeps the mean: only the scale changes
    torch.testing.assert_close(rl.masked_whiten(x, mask, shift_mean=False), t([[1, 2, 3, 0]]), atol=1e-6, rtol=0)
    assert rl.masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_whitening_ignores_padding_values_and_keeps_padding_zero():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=g)
    mask = t([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]])
    noisy = x + (1 - mask) * 1000.0  # huge values in padding must not move the statistics
    a, b = rl.masked_whiten(x, mask), rl.masked_whiten(noisy, mask)
    torch.testing.assert_close(a, b)
    assert bool((b[mask == 0] == 0).all())
    valid = a[mask == 1]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert valid.var(unbiased=True).item() == pytest.approx(1.0, abs=1e-5)


def test_whitening_over_ranks_equals_whitening_the_concatenated_batch():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    mask[:, 0] = 1
    full = rl.masked_whiten(x, mask)
    halves = [(x[:3], mask[:3]), (x[3:], mask[3:])]
    # two "ranks" as threads; all_reduce sums what both contributed, like torch.distributed's
    barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

    def run(rank):
        def all_reduce(stat):
            slots[rank] = stat
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total
        results[rank] = rl.masked_whiten(*halves[rank], all_reduce=all_reduce)

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    torch.testing.assert_close(torch.cat(results), full)
    # one rank alone whitens with its own statistics: a different answer
    assert not torch.allclose(rl.masked_whiten(*halves[0]), full[:3])


# ---------------------------------------------------------------------------- GAE (P6)

def test_gae_hand_computed():
    adv, ret = rl.gae(t([[0, 1, 5]]), t([[1, 2, 7]]), t([[1, 1, 0]]), gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, t([[0.35, -1.0, 0.0]]))
    torch.testing.assert_close(ret, t([[1.35, 1.0, 0.0]]))


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    # γ = λ = 1 (the public code's setting): A_t = Σ_{k>=t} r_k - V_t, R_t = Σ_{k>=t} r_k
    rewards, values, mask = t([[0.5, -1, 2, 0]]), t([[0.1, 0.2, 0.3, 0.4]]), t([[1, 1, 1, 0]])
    adv, ret = rl.gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(ret, t([[1.5, 1.0, 2.0, 0.0]]))
    torch.testing.assert_close(adv, t([[1.4, 0.8, 1.7, 0.0]]))


def test_gae_matches_the_direct_sum_and_is_padding_invariant():
    g = torch.Generator().manual_seed(3)
    B, T, gamma, lam = 4, 7, 0.95, 0.8
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    lengths = [7, 3, 1, 5]
    mask = torch.zeros(B, T)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    adv, ret = rl.gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        v = [float(values[b, k]) if k < n else 0.0 for k in range(T + 1)]
        deltas = [float(rewards[b, k]) + gamma * v[k + 1] - v[k] for k in range(n)]
        for k in range(n):
            direct = sum((gamma * lam) ** i * deltas[k + i] for i in range(n - k))
            assert float(adv[b, k]) == pytest.approx(direct, abs=1e-5)
        assert bool((adv[b, n:] == 0).all()) and bool((ret[b, n:] == 0).all())
    torch.testing.assert_close(ret, (adv + values) * mask)
    # garbage in padding changes nothing; more padding columns change nothing (P9)
    noisy_r = rewards + (1 - mask) * 50
    noisy_v = values - (1 - mask) * 50
    adv2, ret2 = rl.gae(noisy_r, noisy_v, mask, gamma, lam)
    torch.testing.assert_close(adv2, adv)
    padded = rl.gae(torch.cat([rewards, torch.randn(B, 3)], 1), torch.cat([values, torch.randn(B, 3)], 1),
                    torch.cat([mask, torch.zeros(B, 3)], 1), gamma, lam)
    torch.testing.assert_close(padded[0][:, :T], adv)
    torch.testing.assert_close(padded[1][:, :T], ret)


# ---------------------------------------------------------------------------- losses (P8)

def test_policy_loss_hand_computed():
    old = torch.zeros(1, 2)
    logprobs = torch.log(t([[1.5, 0.5]]))
    out = rl.policy_loss(logprobs, old, t([[1.0, 1.0]]), t([[1, 1]]), clip_range=0.2)
    assert out.loss.item() == pytest.approx(-0.85, abs=1e-6)
    assert out.clipfrac.item() == pytest.approx(0.5)
    assert out.ratio.item() == pytest.approx(1.0)
    # k3: ((1.5 - 1) - ln 1.5 + (0.5 - 1) - ln 0.5) / 2
    assert out.approx_kl.item() == pytest.approx(((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2, abs=1e-6)
    # negative advantages: max(1.5, 1.2) = 1.5 (unclipped); max(0.5, 0.8) = 0.8 (clipped)
    out = rl.policy_loss(logprobs, old, t([[-1.0, -1.0]]), t([[1, 1]]), clip_range=0.2)
    assert out.loss.item() == pytest.approx(1.15, abs=1e-6)
    assert out.clipfrac.item() == pytest.approx(0.5)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage_with_no_clipping():
    g = torch.Generator().manual_seed(4)
    lp = torch.randn(3, 5, generator=g)
    adv = torch.randn(3, 5, generator=g)
    mask = t([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    lp_grad = lp.clone().requires_grad_(True)
    out = rl.policy_loss(lp_grad, lp, adv, mask, 0.2)
    assert out.ratio.item() == 1.0 and out.clipfrac.item() == 0.0 and out.approx_kl.item() == 0.0
    assert out.loss.item() == pytest.approx(-rl.masked_mean(adv, mask).item(), abs=1e-6)
    out.loss.backward()
    # d loss / d logπ = -A / n_valid on valid tokens, 0 on padding
    torch.testing.assert_close(lp_grad.grad, -adv * mask / mask.sum())


def test_policy_loss_ignores_padding():
    lp, old, adv = t([[-1.0, 3.0]]), t([[-1.2, -7.0]]), t([[2.0, 100.0]])
    a = rl.policy_loss(lp, old, adv, t([[1, 0]]), 0.2)
    b = rl.policy_loss(lp[:, :1], old[:, :1], adv[:, :1], t([[1]]), 0.2)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.clipfrac, b.clipfrac)


def test_value_loss_hand_computed():
    values = t([[1.5, 2.1, 1.1, 9.0]])
    old = t([[1.0, 1.0, 1.0, 0.0]])
    returns = t([[2.0, 2.0, 2.0, 0.0]])
    loss, clipfrac = rl.value_loss(values, old, returns, t([[1, 1, 1, 0]]), clip_range=0.2)
    # ½·max(0.25, 0.64) = 0.32; ½·max(0.01, 0.64) = 0.32; ½·0.81 = 0.405 → mean 0.348333
    assert loss.item() == pytest.approx((0.32 + 0.32 + 0.405) / 3, abs=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 3)


def test_value_loss_unclipped_inside_the_range_is_half_mse():
    values, old, returns = t([[1.05, 0.9]]), t([[1.0, 1.0]]), t([[3.0, -1.0]])
    loss, clipfrac = rl.value_loss(values, old, returns, t([[1, 1]]), clip_range=0.2)
    assert loss.item() == pytest.approx(0.5 * ((1.95 ** 2) + (1.9 ** 2)) / 2, abs=1e-6)
    assert clipfrac.item() == 0.0


def test_explained_variance():
    returns, mask = t([[1, 2, 3, 0]]), t([[1, 1, 1, 0]])
    assert rl.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert rl.explained_variance(torch.zeros(1, 4), returns, mask) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(rl.explained_variance(returns, torch.ones(1, 4), mask))


# ---------------------------------------------------------------------------- minibatches (P10)

def test_minibatches_use_each_sample_exactly_once_per_epoch():
    for seed in range(3):
        batches = rl.minibatch_indices(12, 4, seed)
        assert len(batches) == 3 and all(len(b) == 4 for b in batches)
        assert sorted(torch.cat(batches).tolist()) == list(range(12))
    assert [b.tolist() for b in rl.minibatch_indices(12, 4, 7)] == [b.tolist() for b in rl.minibatch_indices(12, 4, 7)]
    assert torch.cat(rl.minibatch_indices(12, 4, 0)).tolist() != torch.cat(rl.minibatch_indices(12, 4, 1)).tolist()
    with pytest.raises(ValueError):
        rl.minibatch_indices(10, 4, 0)


def test_minibatches_do_not_touch_the_global_rng():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    rl.minibatch_indices(8, 2, 5)
    assert torch.equal(before, torch.get_rng_state())


# ---------------------------------------------------------------------------- KL controllers

def test_fixed_kl_controller():
    c = rl.make_kl_controller(0.1, target=None, horizon=10000)
    assert isinstance(c, rl.FixedKLController)
    assert c.update(kl=100.0, n_steps=256) == 0.1


def test_adaptive_kl_controller_hand_computed_and_state():
    c = rl.make_kl_controller(0.1, target=6.0, horizon=10000)
    assert c.update(kl=12.0, n_steps=256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    value = c.value
    assert c.update(kl=3.0, n_steps=256) == pytest.approx(value * (1 - 0.2 * 256 / 10000))
    value = c.value
    assert c.update(kl=6.6, n_steps=100) == pytest.approx(value * (1 + 0.1 * 100 / 10000))
    restored = rl.make_kl_controller(0.5, target=1.0, horizon=1.0)
    restored.load_state_dict(c.state_dict())
    assert restored.state_dict() == c.state_dict()
    with pytest.raises(ValueError):
        rl.FixedKLController(0.1).load_state_dict(c.state_dict())
    with pytest.raises(ValueError):
        rl.make_kl_controller(0.1, target=0.0, horizon=1.0)
