"""Tests for opsdl_core.train.losses (CPU, fixed seeds, a few seconds)."""

import math

import pytest
import torch

from opsdl_core.train.losses import (LOSS_KINDS, LossOutput, compute_loss, forward_kl_loss, jsd_loss, masked_mean,
                                     needs_full_logits, pointwise_reverse_kl_loss, reverse_kl_loss,
                                     topk_reverse_kl_loss)

FULL_KINDS = [k for k in LOSS_KINDS if k != "pointwise"]


def _logits(seed, B=2, R=4, V=6, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, R, V, generator=g) * scale


MASK = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.float32)  # 5 real tokens of 8


def _inputs(kind, seed=0, mask=MASK):
    """Student (leaf, requires grad), teacher (leaf, requires grad) and extra kwargs for compute_loss."""
    B, R = mask.shape
    if kind == "pointwise":
        g = torch.Generator().manual_seed(seed)
        s = (-torch.rand(B, R, generator=g) * 3).requires_grad_()
        t = (-torch.rand(B, R, generator=g) * 3).requires_grad_()
        sampler = -torch.rand(B, R, generator=g) * 3
        return s, t, dict(student_logprobs=s, teacher_logprobs=t, sampler_logprobs=sampler,
                          advantage_clip=1.0, is_ratio_clip=2.0)
    s = _logits(seed, B, R).requires_grad_()
    t = _logits(seed + 1, B, R).requires_grad_()
    return s, t, dict(student_logits=s, teacher_logits=t, temperature=0.9, jsd_beta=0.3, topk=3)


# ----------------------------------------------------------------------------- 1. Monte Carlo unbiasedness


def test_pointwise_gradient_is_unbiased_reverse_kl_gradient():
    P, V, N = 3, 7, 200_000
    g = torch.Generator().manual_seed(1234)
    theta = (torch.randn(P, V, generator=g, dtype=torch.float64) * 1.5).requires_grad_()  # float64: exact sums
    teacher = torch.randn(P, V, generator=g, dtype=torch.float64) * 1.5
    log_q = torch.log_softmax(teacher, -1)

    # Exact gradient of mean_p KL(p_theta || q) (closed form).
    log_p = torch.log_softmax(theta, -1)
    exact_kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    (g_exact,) = torch.autograd.grad(exact_kl, theta, retain_graph=True)
    assert g_exact.abs().max() > 0.15  # the comparison below is meaningful

    # N on-policy samples per position, laid out as B=P sequences of R=N tokens.
    y = torch.multinomial(log_p.detach().exp(), N, replacement=True, generator=g)
    s_lp = log_p.gather(1, y)
    t_lp = log_q.gather(1, y)
    ones = torch.ones(P, N)
    out = pointwise_reverse_kl_loss(student_logprobs=s_lp, teacher_logprobs=t_lp, mask=ones)
    (g_mc,) = torch.autograd.grad(out.loss, theta, retain_graph=True)

    # Per-sample score-function terms give the MC standard error of each gradient entry.
    p = log_p.detach().exp()
    adv = (t_lp - s_lp).detach()
    terms = -adv[..., None] * (torch.nn.functional.one_hot(y, V).double() - p[:, None, :]) / P  # [P, N, V]
    assert torch.allclose(terms.mean(1), g_mc, atol=1e-10)
    se = terms.std(1) / math.sqrt(N)
    assert se.max() < 0.0015  # so atol=0.01 is > 6 standard errors
    err = (g_mc - g_exact).abs()
    assert err.max() < 0.01, err
    assert (err < 4 * se + 1e-6).all(), err / se
    assert out.metrics["kl_estimate"] == pytest.approx(exact_kl.item(), abs=0.01)

    # Deliberately wrong estimators are far off at this precision.
    wrong_sign = -masked_mean((t_lp - s_lp).detach() * -1 * s_lp, ones)
    (g_wrong,) = torch.autograd.grad(wrong_sign, theta, retain_graph=True)
    assert (g_wrong - g_exact).abs().max() > 0.2
    pathwise = masked_mean(s_lp - t_lp, ones)  # differentiating the KL sample directly: E[grad] = 0
    (g_path,) = torch.autograd.grad(pathwise, theta)
    assert (g_path - g_exact).abs().max() > 0.2


# ----------------------------------------------------------------------------- 2. brute-force references


def _py_log_softmax(xs):
    mx = max(xs)
    lse = mx + math.log(sum(math.exp(x - mx) for x in xs))
    return [x - lse for x in xs]


def _py_kl(lp, lq):
    return sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))


def _py_token(kind, s_row, t_row, T, beta, k):
    if kind == "topk_reverse_kl":
        top = sorted(range(len(s_row)), key=lambda v: -s_row[v])[:k]
        s_row, t_row = [s_row[v] for v in top], [t_row[v] for v in top]
    ls = _py_log_softmax([x / T for x in s_row])
    lt = _py_log_softmax([x / T for x in t_row])
    if kind in ("reverse_kl", "topk_reverse_kl"):
        return _py_kl(ls, lt)
    if kind == "forward_kl":
        return _py_kl(lt, ls)
    lm = [math.log(beta * math.exp(a) + (1 - beta) * math.exp(b)) for a, b in zip(lt, ls)]
    return beta * _py_kl(lt, lm) + (1 - beta) * _py_kl(ls, lm)


@pytest.mark.parametrize("kind", FULL_KINDS)
@pytest.mark.parametrize("temperature,beta,k", [(1.0, 0.5, 3), (0.7, 0.2, 4)])
def test_full_distribution_losses_match_python_reference(kind, temperature, beta, k):
    s, t = _logits(10), _logits(11)
    B, R, _ = s.shape
    out = compute_loss(kind, student_logits=s, teacher_logits=t, mask=MASK, temperature=temperature,
                       jsd_beta=beta, topk=k)
    ref = [[_py_token(kind, s[b, r].tolist(), t[b, r].tolist(), temperature, beta, k) if MASK[b, r] else 0.0
            for r in range(R)] for b in range(B)]
    ref_loss = sum(map(sum, ref)) / MASK.sum().item()
    assert isinstance(out, LossOutput)
    torch.testing.assert_close(out.per_token, torch.tensor(ref), atol=1e-5, rtol=0)
    assert out.loss.item() == pytest.approx(ref_loss, abs=1e-5)
    assert out.metrics["kl_mean"] == pytest.approx(ref_loss, abs=1e-5)
    assert out.metrics["tokens"] == 5.0
    assert ref_loss > 0.05  # non-trivial case


def test_compute_loss_dispatches_to_the_named_function():
    s, t = _logits(3), _logits(4)
    kw = dict(student_logits=s, teacher_logits=t, mask=MASK, temperature=1.3)
    direct = {
        "reverse_kl": reverse_kl_loss(**kw), "forward_kl": forward_kl_loss(**kw),
        "jsd": jsd_loss(**kw, beta=0.25), "topk_reverse_kl": topk_reverse_kl_loss(**kw, k=2),
    }
    values = {kind: compute_loss(kind, **kw, jsd_beta=0.25, topk=2).loss.item() for kind in FULL_KINDS}
    assert values == {kind: o.loss.item() for kind, o in direct.items()}
    assert len(set(values.values())) == 4
    assert [needs_full_logits(k) for k in LOSS_KINDS] == [False, True, True, True, True]


# ----------------------------------------------------------------------------- 3. top-k specifics


@pytest.mark.parametrize("k", [6, 50])
def test_topk_with_k_at_least_vocab_equals_reverse_kl(k):
    s1, s2 = _logits(5).requires_grad_(), _logits(5).requires_grad_()
    t = _logits(6)
    full = reverse_kl_loss(student_logits=s1, teacher_logits=t, mask=MASK, temperature=0.8)
    topk = topk_reverse_kl_loss(student_logits=s2, teacher_logits=t, mask=MASK, temperature=0.8, k=k)
    full.loss.backward()
    topk.loss.backward()
    assert topk.loss.item() == full.loss.item()
    torch.testing.assert_close(s2.grad, s1.grad, atol=0, rtol=0)
    # ... whereas a real truncation changes the value.
    assert topk_reverse_kl_loss(student_logits=s1, teacher_logits=t, mask=MASK, k=2).loss.item() != pytest.approx(
        full.loss.item(), abs=1e-3)


def test_topk_gradient_flows_only_through_student_topk_logits():
    s, t = _logits(7).requires_grad_(), _logits(8).requires_grad_()
    out = topk_reverse_kl_loss(student_logits=s, teacher_logits=t, mask=MASK, k=3)
    out.loss.backward()
    assert t.grad is None
    in_topk = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.detach().topk(3, -1).indices, True)
    real = MASK.bool()[..., None]
    assert (s.grad[~in_topk] == 0).all()
    assert (s.grad[~real.expand_as(s)] == 0).all()
    assert (s.grad[in_topk & real] != 0).all()
    assert 0 < out.metrics["topk_mass_student"] < 1 and 0 < out.metrics["topk_mass_teacher"] < 1


# ----------------------------------------------------------------------------- 4. clipping and IS truncation


def test_advantage_clipping_hand_made():
    s = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0]], requires_grad=True)
    t = torch.tensor([[-1.2, -0.5, -0.5, -6.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])  # last token would be clipped but is masked out
    out = pointwise_reverse_kl_loss(student_logprobs=s, teacher_logprobs=t, mask=mask, advantage_clip=1.0)
    # A = [-0.2, 1.5, 0, -3.0] -> clipped [-0.2, 1.0, 0, -1.0]; 2 of 4 real tokens clipped.
    clipped = torch.tensor([-0.2, 1.0, 0.0, -1.0, 0.0])
    assert out.metrics["clip_frac"] == 0.5
    # loss = -((-0.2)(-1) + (1)(-2) + 0 + (-1)(-3)) / 4 = -1.2 / 4
    assert out.loss.item() == pytest.approx(-0.3, abs=1e-6)
    assert out.metrics["advantage_mean"] == pytest.approx(-0.05, abs=1e-6)
    assert out.metrics["advantage_abs_mean"] == pytest.approx(0.55, abs=1e-6)
    assert out.metrics["kl_estimate"] == pytest.approx((-0.2 + 1.5 + 0 - 3.0) / 4 * -1, abs=1e-6)
    out.loss.backward()
    torch.testing.assert_close(s.grad[0], -clipped / 4)
    # Without clipping the same input gives clip_frac 0 and the raw advantages.
    raw = pointwise_reverse_kl_loss(student_logprobs=s, teacher_logprobs=t, mask=mask)
    assert raw.metrics["clip_frac"] == 0.0
    assert raw.loss.item() == pytest.approx(-(0.2 - 3.0 + 0 + 9.0) / 4, abs=1e-6)


def test_importance_ratio_truncation_hand_made():
    s = torch.tensor([[-1.0, -1.0, -2.0]], requires_grad=True)
    sampler = torch.tensor([[-1.0, -1.5, -1.0]])  # ratios 1, e^0.5 = 1.649, e^-1 = 0.368
    t = torch.tensor([[-0.5, -2.0, -2.5]])  # A = [0.5, -1.0, -0.5]
    mask = torch.ones(1, 3)
    out = pointwise_reverse_kl_loss(student_logprobs=s, teacher_logprobs=t, mask=mask, sampler_logprobs=sampler,
                                    is_ratio_clip=1.2)
    w = [1.0, 1.2, math.exp(-1.0)]  # second ratio truncated to 1.2
    hand = -(w[0] * 0.5 * -1.0 + w[1] * -1.0 * -1.0 + w[2] * -0.5 * -2.0) / 3
    assert out.loss.item() == pytest.approx(hand, abs=1e-6)
    assert out.loss.item() == pytest.approx(-(-0.5 + 1.2 + math.exp(-1.0)) / 3, abs=1e-6)
    assert out.metrics["is_ratio_mean"] == pytest.approx((1 + math.exp(0.5) + math.exp(-1)) / 3, abs=1e-6)
    assert out.metrics["is_weight_mean"] == pytest.approx(sum(w) / 3, abs=1e-6)
    assert out.metrics["is_trunc_frac"] == pytest.approx(1 / 3)
    out.loss.backward()  # weights are stop-gradient: d loss / d s_t = -w_t A_t / 3
    torch.testing.assert_close(s.grad[0], -torch.tensor(w) * torch.tensor([0.5, -1.0, -0.5]) / 3)

    untruncated = pointwise_reverse_kl_loss(student_logprobs=s, teacher_logprobs=t, mask=mask,
                                            sampler_logprobs=sampler)
    assert untruncated.loss.item() == pytest.approx(-(-0.5 + math.exp(0.5) + math.exp(-1.0)) / 3, abs=1e-6)
    no_sampler = pointwise_reverse_kl_loss(student_logprobs=s, teacher_logprobs=t, mask=mask, is_ratio_clip=1.2)
    assert no_sampler.loss.item() == pytest.approx(-(-0.5 + 1.0 + 1.0) / 3, abs=1e-6)
    assert no_sampler.metrics["is_ratio_mean"] == 1.0


# ----------------------------------------------------------------------------- 5. masking


def _perturb_masked(x, mask, seed):
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * 5
    m = mask.bool().reshape(mask.shape + (1,) * (x.dim() - mask.dim()))
    return torch.where(m, x.detach(), x.detach() + noise).requires_grad_()


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_masked_positions_contribute_nothing(kind):
    s, t, kw = _inputs(kind, seed=20)
    names = ("student_logprobs", "teacher_logprobs") if kind == "pointwise" else ("student_logits", "teacher_logits")
    out = compute_loss(kind, mask=MASK, **kw)
    out.loss.backward()

    s2, t2 = _perturb_masked(s, MASK, 1), _perturb_masked(t, MASK, 2)
    kw2 = {**kw, names[0]: s2, names[1]: t2}
    if kind == "pointwise":
        kw2["sampler_logprobs"] = _perturb_masked(kw["sampler_logprobs"], MASK, 3).detach()
    out2 = compute_loss(kind, mask=MASK, **kw2)
    out2.loss.backward()

    assert not torch.equal(s2, s) and not torch.equal(t2, t)
    assert out2.loss.item() == pytest.approx(out.loss.item(), abs=1e-6)
    torch.testing.assert_close(s2.grad, s.grad)
    torch.testing.assert_close(out2.per_token, out.per_token)
    assert (out.per_token[~MASK.bool()] == 0).all()
    masked_grad = s.grad[~MASK.bool()]
    assert (masked_grad == 0).all() and s.grad.abs().sum() > 0
    assert out.metrics == pytest.approx(out2.metrics, abs=1e-6)


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_all_masked_batch_gives_zero_loss_without_nan(kind, mask_dtype):
    mask = torch.zeros(2, 4, dtype=mask_dtype)
    s, _, kw = _inputs(kind, seed=30, mask=mask)
    out = compute_loss(kind, mask=mask, **kw)
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert torch.isfinite(s.grad).all() and (s.grad == 0).all()
    assert out.metrics["tokens"] == 0.0
    assert all(math.isfinite(v) for v in out.metrics.values())
    assert (out.per_token == 0).all()


def test_masked_mean_ignores_non_finite_masked_values():
    x = torch.tensor([[1.0, float("nan"), 3.0], [float("inf"), 5.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 0, 1], [0, 1, 0]])
    m = masked_mean(x, mask)
    assert m.item() == 3.0
    m.backward()
    torch.testing.assert_close(x.grad, mask.float() / 3)
    zero = masked_mean(x, torch.zeros(2, 3))
    assert zero.item() == 0.0 and zero.requires_grad


def test_bool_and_float_masks_agree():
    s, t = _logits(40), _logits(41)
    a = reverse_kl_loss(student_logits=s, teacher_logits=t, mask=MASK)
    b = reverse_kl_loss(student_logits=s, teacher_logits=t, mask=MASK.bool())
    assert a.loss.item() == b.loss.item()


# ----------------------------------------------------------------------------- 6. teacher gets no gradient


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_teacher_receives_no_gradient(kind):
    s, t, kw = _inputs(kind, seed=50)
    out = compute_loss(kind, mask=MASK, **kw)
    out.loss.backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert not out.per_token.requires_grad


def test_half_precision_logits_are_upcast():
    s = _logits(60).to(torch.bfloat16).requires_grad_()
    t = _logits(61).to(torch.bfloat16)
    out = reverse_kl_loss(student_logits=s, teacher_logits=t, mask=MASK)
    ref = reverse_kl_loss(student_logits=s.detach().float(), teacher_logits=t.float(), mask=MASK)
    assert out.loss.dtype == torch.float32 and out.loss.item() == pytest.approx(ref.loss.item(), abs=1e-6)
    out.loss.backward()
    assert s.grad.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- 7. errors


def test_shape_mismatch_errors_name_the_argument():
    a, b = torch.zeros(2, 3), torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"teacher_logprobs has shape \(2, 4\).*mask has shape \(2, 3\)"):
        pointwise_reverse_kl_loss(student_logprobs=a, teacher_logprobs=b, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"student_logprobs has shape \(2, 3\)"):
        pointwise_reverse_kl_loss(student_logprobs=a, teacher_logprobs=b, mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="sampler_logprobs"):
        pointwise_reverse_kl_loss(student_logprobs=a, teacher_logprobs=a, mask=torch.ones(2, 3), sampler_logprobs=b)
    with pytest.raises(ValueError, match=r"teacher_logits has shape \(2, 4, 5\).*\(2, 4, 6\)"):
        reverse_kl_loss(student_logits=_logits(0), teacher_logits=_logits(0, V=5), mask=MASK)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 3\)"):
        forward_kl_loss(student_logits=_logits(0), teacher_logits=_logits(0), mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"student_logits must be \[B, R, V\]"):
        topk_reverse_kl_loss(student_logits=torch.zeros(2, 4), teacher_logits=torch.zeros(2, 4), mask=MASK, k=2)
    with pytest.raises(ValueError, match="masked_mean"):
        masked_mean(a, torch.ones(2, 4))


def test_bad_hyperparameters_raise():
    kw = dict(student_logits=_logits(0), teacher_logits=_logits(1), mask=MASK)
    for beta in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"0 < beta < 1.*forward_kl.*reverse_kl"):
            jsd_loss(**kw, beta=beta)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        topk_reverse_kl_loss(**kw, k=0)
    with pytest.raises(ValueError, match="temperature"):
        reverse_kl_loss(**kw, temperature=0.0)
    lp = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="advantage_clip"):
        pointwise_reverse_kl_loss(student_logprobs=lp, teacher_logprobs=lp, mask=MASK, advantage_clip=0.0)
    with pytest.raises(ValueError, match="is_ratio_clip"):
        pointwise_reverse_kl_loss(student_logprobs=lp, teacher_logprobs=lp, mask=MASK, is_ratio_clip=-1.0)


def test_dispatcher_errors():
    with pytest.raises(ValueError, match="unknown loss kind 'kl'") as e:
        compute_loss("kl", mask=MASK, student_logits=_logits(0), teacher_logits=_logits(1))
    assert all(k in str(e.value) for k in LOSS_KINDS)
    with pytest.raises(ValueError, match="unknown loss kind"):
        needs_full_logits("reverse-kl")
    with pytest.raises(ValueError, match=r"'reverse_kl' requires teacher_logits") as e:
        compute_loss("reverse_kl", mask=MASK, student_logits=_logits(0), teacher_logprobs=torch.zeros(2, 4))
    assert "student_logits" not in str(e.value)
    with pytest.raises(ValueError, match=r"'pointwise' requires student_logprobs and teacher_logprobs"):
        compute_loss("pointwise", mask=MASK, student_logits=_logits(0), teacher_logits=_logits(1))


# ----------------------------------------------------------------------------- 8. pointwise hand example


def test_pointwise_value_on_tiny_example():
    s = torch.tensor([[-0.5, -1.0, -2.0]], requires_grad=True)
    t = torch.tensor([[-0.7, -0.2, -2.5]])
    out = compute_loss("pointwise", mask=torch.ones(1, 3, dtype=torch.bool), student_logprobs=s, teacher_logprobs=t)
    # A = t - s = [-0.2, 0.8, -0.5]; A*s = [0.1, -0.8, 1.0]; loss = -(0.3)/3
    assert out.loss.item() == pytest.approx(-0.1, abs=1e-6)
    torch.testing.assert_close(out.per_token, torch.tensor([[-0.1, 0.8, -1.0]]))
    assert out.metrics["kl_estimate"] == pytest.approx(-0.1 / 3, abs=1e-6)
    assert out.metrics["advantage_mean"] == pytest.approx(0.1 / 3, abs=1e-6)
    assert out.metrics["tokens"] == 3.0
    out.loss.backward()
    torch.testing.assert_close(s.grad, torch.tensor([[0.2, -0.8, 0.5]]) / 3)
