"""pypaper.snn.DelayedLinear, review s35: a user porting the SNN-delays training script
(Hammouamri et al., ICLR 2024) - mixed precision, the causal padding at short sequences, the
sigma schedule and rounding across state_dicts, torch.compile with a LIF, torch.func.

The layer is checked against a dense Gaussian-kernel convolution written here from the paper's
formula (independent of pypaper/snn/delays_reference.py, which is conv1d over a flipped kernel):

    g_{o,i}(d) = exp(-(d - p)^2 / (2 sigma^2)) / sum_{d' in W} exp(-(d' - p)^2 / (2 sigma^2)),
    W = [floor(p) - R + 1, floor(p) + R] within [0, K - 1],  R = min(ceil(3 sigma), K)
    y[t] = b + sum_d (x[t - d] @ (w * g(d))^T),   x[t < 0] = 0

with p = clamp(position, 0, K - 1); sigma = 0 is one tap at round(p).
"""
import math

import pytest
import torch

import pypaper
from pypaper.snn import DelayedLinear
from pypaper.snn import delays as D

HAVE_OP = pypaper._ext.LOADED and hasattr(torch.ops.pypaper, "delay_linear")
needs_op = pytest.mark.skipif(not HAVE_OP, reason="pypaper._C without the delay ops")

PATHS = ["gather", "dense", "conv"]  # PYPAPER_DELAY_PATH: every CPU formulation


def gauss_taps(position, sigma, K):
    """g[o, i, d] by the formula above, in torch ops (differentiable in position)."""
    inside = (position >= 0) & (position <= K - 1)
    p = torch.where(inside, position, position.detach().clamp(0, K - 1))
    d = torch.arange(K, dtype=position.dtype)
    if sigma == 0:
        return (d == torch.round(p.detach()).unsqueeze(-1)).to(position.dtype) + 0 * p[..., None]
    R = min(math.ceil(3 * sigma), K)
    f = torch.floor(p.detach()).unsqueeze(-1)
    window = (d >= f - R + 1) & (d <= f + R)
    e = torch.exp(-((d - p.unsqueeze(-1)) ** 2) / (2 * sigma * sigma)) * window
    return e / e.sum(-1, keepdim=True)


def hand_dense(x, weight, position, bias, K, sigma):
    """The delayed linear layer as K shifted matmuls (causal: zeros before t = 0)."""
    T, N, _ = x.shape
    k = weight.unsqueeze(-1) * gauss_taps(position, sigma, K)  # [C_out, C_in, K]
    y = x.new_zeros(T, N, weight.shape[0])
    for d in range(min(K, T)):
        shifted = torch.cat([x.new_zeros(d, N, x.shape[2]), x[:T - d]])
        y = y + shifted @ k[..., d].t()
    return y if bias is None else y + bias


def make(T, N, C_in, C_out, K, margin=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N, C_in, dtype=torch.float64, generator=g)
    w = torch.randn(C_out, C_in, dtype=torch.float64, generator=g)
    if margin is None:  # some positions outside [0, K - 1]: the clamp
        p = torch.rand(C_out, C_in, dtype=torch.float64, generator=g) * (K + 1) - 1
    else:  # inside and `margin` away from integers (g has kinks there): gradcheck
        p = (torch.randint(0, max(K - 1, 1), (C_out, C_in), generator=g).double() + margin
             + (1 - 2 * margin) * torch.rand(C_out, C_in, dtype=torch.float64, generator=g))
        if K == 1:
            p = torch.zeros_like(p)
    b = torch.randn(C_out, dtype=torch.float64, generator=g)
    return x, w, p, b


# ---- regression: the convolution path under torch.autocast -----------------------------------

@needs_op
@pytest.mark.parametrize("sigma", [0.0, 0.6, 4.0])
def test_convolution_path_ignores_cpu_autocast_as_the_op_does(sigma, monkeypatch):
    """On the CPU backend the convolution stands in for the C++ op when the windows are wide
    (AMD CPUs, 2R >= 3K/4 - what SNN-delays' first epochs run - or PYPAPER_DELAY_PATH=conv): a
    speed choice that must not change the numbers. Under torch.autocast('cpu', bfloat16) it ran
    conv1d in bfloat16 (output error ~2e-3 against float32, the gradients ~3e-2) while the C++
    op, the same layer under torch.compile and the same layer later in the sigma schedule
    computed in float32: the layer's precision followed sigma, and eager differed from
    compiled. Now every path computes in float32 under autocast, as for bf16 / fp16 inputs."""
    torch.manual_seed(0)
    layer = DelayedLinear(16, 8, 10)
    if sigma == 0:
        layer.round_delays()
    else:
        layer.set_sigma(sigma)
    x = (torch.rand(12, 4, 16) < 0.3).float()
    grads = {}
    for path in ("gather", "conv"):
        monkeypatch.setenv("PYPAPER_DELAY_PATH", path)
        for amp in (False, True):
            layer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                y = layer(x)
            assert y.dtype == torch.float32
            (y * torch.linspace(-1, 1, 8)).sum().backward()
            grads[path, amp] = [y.detach()] + [p.grad.clone() for p in layer.parameters()
                                                if p.grad is not None]
    for path in ("gather", "conv"):
        for a, b in zip(grads[path, True], grads[path, False]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # autocast changes nothing
    for a, b in zip(grads["conv", True], grads["gather", True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_op
def test_amd_eager_convolution_under_autocast_equals_the_compiled_layer(monkeypatch):
    """The AMD choice itself (eager: the convolution at sigma = K/3; compiled: the C++ op's
    GEMMs, sigma's value being unknown to the graph): under autocast the two agree to float32
    rounding (they differed by ~2e-3)."""
    monkeypatch.setenv("PYPAPER_DELAY_PATH", "auto")
    monkeypatch.setattr(D, "_CPU_IS_AMD", True)
    torch.manual_seed(0)
    layer = DelayedLinear(32, 16, 25)  # sigma_init 8.33: the convolution in eager mode on AMD
    assert D._runs_as_convolution(25, layer.sigma)
    x = (torch.rand(30, 4, 32) < 0.3).float()
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, comp = layer(x), compiled(x)
    torch.testing.assert_close(eager, comp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager, layer(x), rtol=0, atol=0)


# ---- the layer against the hand-written dense Gaussian convolution ----------------------------

@needs_op
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sigma", [0.0, 0.5, 1.3, 7.0])
@pytest.mark.parametrize("shape", [(1, 2, 3, 2, 6),      # T = 1
                                   (3, 2, 4, 3, 10),     # T < max_delay
                                   (6, 0, 3, 2, 4),      # N = 0
                                   (9, 3, 1, 1, 5),      # one input, one output
                                   (7, 2, 3, 2, 1)],     # max_delay = 1: nn.Linear
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False])
def test_layer_equals_the_hand_written_gaussian_convolution(shape, sigma, path, bias,
                                                            monkeypatch):
    monkeypatch.setenv("PYPAPER_DELAY_PATH", path)
    T, N, C_in, C_out, K = shape
    x, w, p, b = make(T, N, C_in, C_out, K)
    b = b if bias else None
    got = D.delayed_linear(x, w, p, b, max_delay=K, sigma=sigma)
    want = hand_dense(x, w, p, b, K, sigma)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@needs_op
@pytest.mark.parametrize("path", PATHS)
def test_output_is_causal(path, monkeypatch):
    """y[t] reads x[t - d], d >= 0 only: changing x at t0 leaves every y[t < t0] unchanged."""
    monkeypatch.setenv("PYPAPER_DELAY_PATH", path)
    x, w, p, b = make(12, 2, 3, 4, 8)
    for sigma in (0.0, 0.7, 5.0):
        y0 = D.delayed_linear(x, w, p, b, max_delay=8, sigma=sigma)
        x2 = x.clone()
        x2[5:] += 1.0
        y1 = D.delayed_linear(x2, w, p, b, max_delay=8, sigma=sigma)
        assert torch.equal(y0[:5], y1[:5])
        assert not torch.equal(y0[5:], y1[5:])


@needs_op
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sigma", [0.4, 1.3, 3.0])
def test_fp64_gradients_of_weight_and_position_equal_the_hand_written(sigma, path, monkeypatch):
    """gradcheck of the op (x, weight, position, bias), and its gradients equal autograd through
    the hand-written convolution."""
    monkeypatch.setenv("PYPAPER_DELAY_PATH", path)
    K = 6
    ins = [t.requires_grad_() for t in make(7, 2, 3, 2, K, margin=0.15)]
    assert torch.autograd.gradcheck(
        lambda *a: D.delayed_linear(*a, max_delay=K, sigma=sigma), ins)
    gy = torch.randn(7, 2, 2, dtype=torch.float64)
    got = torch.autograd.grad(D.delayed_linear(*ins, max_delay=K, sigma=sigma), ins, gy)
    want = torch.autograd.grad(hand_dense(*ins, K, sigma), ins, gy)
    for name, a, e in zip(("x", "weight", "position", "bias"), got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)


# ---- the sigma schedule, rounding and state_dicts ---------------------------------------------

@needs_op
def test_strict_load_across_sigmas_and_rounding():
    """A checkpoint carries its sigma and whether it was rounded; strict loading restores both
    (the SNN-delays fine-tuning step: load the pre-trained model, round, train the weights)."""
    torch.manual_seed(0)
    x = torch.randn(10, 2, 4)
    src = DelayedLinear(4, 3, 8)
    src.set_sigma(D.sigma_schedule(3, 10, src.sigma_init))
    dst = DelayedLinear(4, 3, 8)
    dst.set_sigma(0.5)
    dst.load_state_dict(src.state_dict(), strict=True)
    assert dst.sigma == src.sigma and not dst.finalized
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    src.round_delays()
    dst.load_state_dict(src.state_dict(), strict=True)
    assert dst.finalized and dst.sigma == 0 and not dst.position.requires_grad
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    opt = torch.optim.Adam(p for p in dst.parameters() if p.requires_grad)
    before = dst.delays.clone()
    for _ in range(3):  # fine-tuning the weights keeps the delays
        dst(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        dst.clamp_positions_()
    assert torch.equal(dst.delays, before)


@needs_op
@pytest.mark.parametrize("version,SIG", [("max", 0.0), ("gauss", 0.23), ("gauss", 3.0)])
def test_porting_recipe_reproduces_snn_delays_padding_and_positions(version, SIG):
    """The class docstring's recipe against DCLS itself, as SNN-delays runs it: Dcls1d on the
    input padded by K - 1 steps on the left and (K - 1) // 2 on the right equals DelayedLinear
    on x padded by (K - 1) // 2 steps on the right, with position = K - 1 - K // 2 - P and
    sigma = SIG + 0.27 (rounded: the fine-tuning's 'max' version at SIG 0, exact up to DCLS's
    1e-7 normaliser; 'gauss': up to pypaper's cut-off, 0.5% of the output)."""
    DCLS = pytest.importorskip("DCLS.construct.modules")
    F = torch.nn.functional
    torch.manual_seed(0)
    K, c_in, c_out, T, N = 21, 6, 5, 30, 3
    ref = DCLS.Dcls1d(c_in, c_out, kernel_count=1, dilated_kernel_size=K, bias=False,
                      version=version).double()
    with torch.no_grad():
        ref.P.uniform_(-(K // 2), K // 2)
        ref.SIG.fill_(SIG)
        if version == "max":
            ref.P.round_()
    x = (torch.rand(T, N, c_in, dtype=torch.float64) < 0.3).double()
    want = ref(F.pad(x.permute(1, 2, 0), (K - 1, (K - 1) // 2))).permute(2, 0, 1).detach()
    layer = DelayedLinear(c_in, c_out, K, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(ref.weight[..., 0])
        layer.position.copy_((K - 1 - K // 2) - ref.P[0, ..., 0])
    if version == "max":
        layer.round_delays()
    else:
        layer.set_sigma(SIG + 0.27)
    got = layer(F.pad(x, (0, 0, 0, 0, 0, (K - 1) // 2)))
    assert got.shape == want.shape == (T + (K - 1) // 2, N, c_out)
    tol = 1e-6 if version == "max" else 5e-3
    assert float((got - want).abs().max()) <= tol * float(want.abs().max())


# ---- torch.compile with a LIF, changing T; torch.func -----------------------------------------

@needs_op
def test_compiled_delays_and_lif_follow_eager_as_t_changes():
    from pypaper.snn import functional as SF
    from pypaper.snn import neuron

    torch.manual_seed(0)
    net = torch.nn.Sequential(DelayedLinear(4, 3, 6), neuron.LIFNode(step_mode="m"))
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    for T in (6, 3, 1, 9):
        x = torch.randn(T, 2, 4) * 2
        SF.reset_net(net)
        want = net(x)
        (want.sum() + net[1].v.sum()).backward()
        g_want = net[0].position.grad.clone()
        net.zero_grad()
        SF.reset_net(net)
        got = compiled(x)
        (got.sum() + net[1].v.sum()).backward()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(net[0].position.grad, g_want, rtol=1e-6, atol=1e-6)
        net.zero_grad()


@needs_op
def test_vmap_over_the_batch_and_jacrev_in_the_positions():
    layer = DelayedLinear(3, 2, 5).double()
    layer.set_sigma(0.8)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(6, 4, 3, dtype=torch.float64)

    def one(xn):  # one sample [T, C_in]
        return torch.func.functional_call(layer, params, (xn.unsqueeze(1),)).squeeze(1)

    torch.testing.assert_close(torch.vmap(one, in_dims=1, out_dims=1)(x), layer(x))

    def out(pos):
        return torch.func.functional_call(layer, {**params, "position": pos}, (x,))

    jac = torch.func.jacrev(out)(params["position"])
    want = torch.func.jacrev(lambda pos: hand_dense(x, params["weight"], pos, params["bias"],
                                                    5, 0.8))(params["position"])
    torch.testing.assert_close(jac, want, rtol=1e-10, atol=1e-10)


# ---- wrong arguments name themselves -----------------------------------------------------------

def test_wrong_arguments_are_named():
    layer = DelayedLinear(4, 3, 5)
    with pytest.raises(ValueError, match="max_delay"):
        DelayedLinear(4, 3, 0)
    with pytest.raises(ValueError, match="sigma"):
        layer.set_sigma(-1.0)
    with pytest.raises(ValueError, match="sigma_init"):
        DelayedLinear(4, 3, 5, sigma_init=float("nan"))
    with pytest.raises(ValueError, match=r"\[T, N, C_in\]"):
        layer(torch.randn(5, 4))
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.randn(5, 2, 3))
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        layer(torch.ones(5, 2, 4, dtype=torch.long))
