"""Benchmarks of pypaper.snn: the fused multi-step LIF neuron.

(Full mode also times a network of SpikingJelly's model zoo as built and after
``pypaper.snn.convert``: zoo_case below.)

Providers: "pypaper" (the device's default backend; "pypaper-cuda" / "pypaper-triton" on GPUs),
"spikingjelly" (SpikingJelly 2.0 LIFNode(step_mode='m'), its default torch backend: the time loop
in Python; the baseline of the speedup column), "snntorch" (snntorch.Leaky stepped in a Python
loop, beta = 1 - 1/tau, hard reset to zero), "reference" (pypaper's plain-PyTorch loop) and
"compiled-reference" (torch.compile of the reference; T <= 64, since the loop unrolls).

Neurons: tau = 2, v_threshold = 1, hard reset to 0, ATan(alpha=2) surrogate; input N(0.6, 1), so
about a quarter of the neuron-steps spike.
"""
import copy
import importlib.util
import math

from . import harness  # first: sets THP_MEM_ALLOC_ENABLE before torch loads
from .harness import Case, Provider, backward_only, forward_backward, saved_bytes, unavailable

import torch  # noqa: E402
from torch import nn  # noqa: E402

import pypaper  # noqa: E402
from pypaper import snn  # noqa: E402
from pypaper.snn import reference as snn_reference  # noqa: E402

QUICK_MODES = ("fwd", "fwd+bwd")
TAU = 2.0
BATCH = 16
MAX_COMPILED_T = 64


# Made once, as a model's neuron holds its surrogate (and as SpikingJelly's LIFNode below is built
# once): constructing the nn.Module on every call cost ~9 us hot, more cold.
_ATAN = snn.surrogate.ATan()


def _pypaper(x):
    return snn.lif_multi_step(x, tau=TAU, surrogate_function=_ATAN)[0]


def _compiled_reference():
    """torch.compile of the reference loop (SURROGATE_IDS['ATan'], alpha 2)."""
    sid = snn_reference.SURROGATE_IDS["ATan"]

    def ref(x):
        decay = torch.tensor(TAU, dtype=torch.float32, device=x.device)
        vth = torch.tensor(1.0, dtype=torch.float32, device=x.device)
        return snn_reference.lif_multi_step(x, None, decay, vth, 0.0, sid, 2.0, True, True,
                                            False, False, False)[0]

    return torch.compile(ref)


def _spikingjelly():
    """SpikingJelly's multi-step LIFNode (reset before every call), or the reason it is missing."""
    if importlib.util.find_spec("spikingjelly") is None:
        return None, "spikingjelly is not installed"
    try:
        from spikingjelly.activation_based import functional, neuron, surrogate
    except Exception as e:  # a broken install (its logger needs loguru, ...)
        return None, f"spikingjelly failed to import ({type(e).__name__}: {e})"
    node = neuron.LIFNode(tau=TAU, surrogate_function=surrogate.ATan(), step_mode="m")

    def run(x):
        functional.reset_net(node)
        return node(x)

    return run, None


def _snntorch():
    """snntorch.Leaky in a per-step loop (its documented usage), or the reason it is missing."""
    if importlib.util.find_spec("snntorch") is None:
        return None, "snntorch is not installed"
    import snntorch
    from snntorch import surrogate

    leaky = snntorch.Leaky(beta=1.0 - 1.0 / TAU, spike_grad=surrogate.atan(),
                           reset_mechanism="zero")

    def run(x):
        mem = leaky.init_leaky()
        out = []
        for t in range(x.shape[0]):
            spk, mem = leaky(x[t], mem)
            out.append(spk)
        return torch.stack(out)

    return run, None


def _provider(name, fn, x, xg, g, modes, params=(), backend=None) -> Provider:
    calls = {}
    inputs = [xg, *params]
    if "fwd" in modes:
        calls["fwd"] = lambda: fn(x)
    if "bwd" in modes:
        calls["bwd"] = backward_only(lambda: fn(xg), inputs, g)
    if "fwd+bwd" in modes:
        calls["fwd+bwd"] = forward_backward(lambda: fn(xg), inputs, g)
    calls = harness.on_backend(calls, backend)
    p = Provider(name, calls)
    if "bwd" in modes or "fwd+bwd" in modes:
        if backend is not None:
            with pypaper.use_backend(backend):
                p.saved_bytes = saved_bytes(lambda: fn(xg), exclude=params)
        else:
            p.saved_bytes = saved_bytes(lambda: fn(xg), exclude=params)
    return p


def _backend_reason(backend, x):
    try:
        with pypaper.use_backend(backend):
            snn.backend_for(x)
    except pypaper.BackendUnavailable as e:
        return str(e)
    return None


def _peer_providers(make, x, steps) -> list:
    """spikingjelly, snntorch, reference and compiled-reference through ``make(name, fn, backend)``."""
    out = []
    sj, why = _spikingjelly()
    out.append(make("spikingjelly", sj, None) if sj else unavailable("spikingjelly", why))
    st, why = _snntorch()
    out.append(make("snntorch", st, None) if st else unavailable("snntorch", why))
    out.append(make("reference", _pypaper, "reference"))
    if steps <= MAX_COMPILED_T:
        out.append(make("compiled-reference", _compiled_reference(), None))
    else:
        out.append(unavailable("compiled-reference",
                               f"torch.compile unrolls the T-step loop: not run for T > {MAX_COMPILED_T}"))
    return out


def _lif_providers(steps, neurons, dtype, device, modes) -> list:
    shape = (steps, BATCH, neurons // BATCH)
    x = (torch.randn(shape, device=device) + 0.6).to(dtype)
    xg = x.detach().clone().requires_grad_()
    g = torch.randn_like(x)

    def make(name, fn, backend):
        return _provider(name, fn, x, xg, g, modes, backend=backend)

    out = [make("pypaper", _pypaper, None)]
    if x.device.type == "cuda":
        for b in ("cuda", "triton"):
            why = _backend_reason(b, x)
            out.append(unavailable(f"pypaper-{b}", why) if why else make(f"pypaper-{b}", _pypaper, b))
    return out + _peer_providers(make, x, steps)


def _lif_bytes(tensor_bytes, modes) -> dict:
    """Bytes the LIF op moves per mode, from the bytes of one [T, N] tensor: fwd X in, S out;
    bwd grad_S and X (or H) in, grad_X out; fwd+bwd both (the backward reruns from X)."""
    return {m: k * tensor_bytes for m, k in (("fwd", 2), ("bwd", 3), ("fwd+bwd", 5)) if m in modes}


def lif_case(steps, neurons, dtype, device, modes=harness.MODES) -> Case:
    """The LIF neuron alone on x [T, 16, neurons/16]."""
    e = torch.empty((), dtype=dtype).element_size()
    per_step = neurons * e
    return Case(
        f"LIF multi-step T={steps}", (steps, BATCH, neurons // BATCH), dtype, device,
        bytes_moved=_lif_bytes(steps * per_step, modes),
        providers=lambda: _lif_providers(steps, neurons, dtype, device, modes),
        bytes_note="fwd (x needs no grad): X read + S written; fwd+bwd: X read + S written, then "
                   "X and grad_S read + grad_X written (the least: the backward reruns the forward "
                   "from X; an op that keeps H writes and reads one [T, N] more, 6 instead of 5); "
                   "bwd: grad_S and the kept X or H read + grad_X written",
        baseline="spikingjelly",
    )


# ---- forward mode: the jvp of the LIF neuron ----------------------------------------------------


def _jvp_providers(steps, neurons, dtype, device) -> list:
    from torch.autograd import forward_ad
    from pypaper.snn import jvp_rule, op_flags

    shape = (steps, BATCH, neurons // BATCH)
    x = (torch.randn(shape, device=device) + 0.6).to(dtype)
    t = torch.randn_like(x)

    def dual():  # spikes and their tangent through pypaper's rule (the fused kernel on CPU)
        with forward_ad.dual_level():
            return forward_ad.unpack_dual(_pypaper(forward_ad.make_dual(x, t))).tangent

    tau, vth = torch.tensor(TAU, device=device), torch.tensor(1.0, device=device)
    sid, alpha = snn.surrogate.surrogate_spec(_ATAN)
    flags = op_flags.forward_flags(True, True, False, False, False, False)

    def composite():  # the same primal op, the tangent from the rule's torch-op composite
        _pypaper(x)
        return jvp_rule.composite((x, None, tau, vth, 0.0, sid, alpha, flags), (t, None, None, None))

    def reference():
        with pypaper.use_backend("reference"):
            return dual()

    out = [Provider("pypaper", {"fwd": dual}), Provider("pypaper-composite", {"fwd": composite}),
           Provider("reference", {"fwd": reference})]
    out.append(unavailable("spikingjelly", "its surrogate autograd.Functions define no jvp: "
                                           "forward-mode AD through its neurons raises"))
    return out


def jvp_case(steps, neurons, dtype, device) -> Case:
    """Spikes and their forward-mode tangent (torch.autograd.forward_ad) on x [T, 16, neurons/16]
    with a tangent on x; "fwd" is the one forward-mode pass."""
    e = torch.empty((), dtype=dtype).element_size()
    return Case(
        f"LIF jvp (forward-mode AD) T={steps}", (steps, BATCH, neurons // BATCH), dtype, device,
        bytes_moved={"fwd": 4 * steps * neurons * e},
        providers=lambda: _jvp_providers(steps, neurons, dtype, device),
        bytes_note="X and its tangent read, S and its tangent written (the fused tangent pass "
                   "reruns the primal from X: one more read of X, not counted)",
        baseline="reference",
    )


# ---- second order: double backward (create_graph) through the LIF neuron -------------------------


def _second_order_providers(steps, neurons, dtype, device) -> list:
    shape = (steps, BATCH, neurons // BATCH)
    x = (torch.randn(shape, device=device) + 0.6).to(dtype).requires_grad_()
    w = torch.randn_like(x)

    def hvp_like(fn):  # d/dx |dL/dx|^2 with L = <w, S(x)>: one forward, two backwards
        def run():
            (g,) = torch.autograd.grad((fn(x) * w).sum(), x, create_graph=True)
            return torch.autograd.grad((g * g).sum(), x)[0]
        return run

    def reference(x):
        with pypaper.use_backend("reference"):
            return _pypaper(x)

    out = [Provider("pypaper", {"fwd+bwd": hvp_like(_pypaper)}),
           Provider("reference", {"fwd+bwd": hvp_like(reference)})]
    sj, why = _spikingjelly()
    out.append(Provider("spikingjelly", {"fwd+bwd": hvp_like(sj)}) if sj is not None
               else unavailable("spikingjelly", why))
    return out


def second_order_case(steps, neurons, dtype, device) -> Case:
    """Double backward on x [T, 16, neurons/16]: the gradient of |dL/dx|^2, L = <w, S(x)>
    (create_graph=True, then a backward through the gradient; MAML and gradient penalties do
    this). "fwd+bwd" is the whole: forward, first backward with its graph, second backward."""
    e = torch.empty((), dtype=dtype).element_size()
    return Case(
        f"LIF double backward T={steps}", (steps, BATCH, neurons // BATCH), dtype, device,
        bytes_moved={"fwd+bwd": 4 * steps * neurons * e},
        providers=lambda: _second_order_providers(steps, neurons, dtype, device),
        bytes_note="X read, S written, X's gradient written then read, its gradient written "
                   "(the least any implementation moves; the torch-op loops move many times that)",
        baseline="spikingjelly",
    )


# ---- Linear(n, n) + LIF, the Open Neuromorphic library benchmark shape -------------------------


def _linear_inputs(steps, n, device):
    """Linear(n, n), its input x [T, 16, n] (and a copy that needs grad), the output gradient
    and the Linear's parameters: the Linear+LIF cases' setup, seeded."""
    torch.manual_seed(0)
    lin = nn.Linear(n, n).to(device)
    x = torch.rand(steps, BATCH, n, device=device)
    xg = x.detach().clone().requires_grad_()
    g = torch.randn(steps, BATCH, n, device=device)
    return lin, x, xg, g, list(lin.parameters())


def _layer_providers(steps, n, device, modes) -> list:
    lin, x, xg, g, params = _linear_inputs(steps, n, device)

    def make(name, neuron_fn, backend):
        if neuron_fn is None:
            return None
        return _provider(name, lambda t: neuron_fn(lin(t)), x, xg, g, modes, params, backend)

    out = [make("pypaper", _pypaper, None)]
    return out + _peer_providers(make, x, steps)


def layer_case(steps, n, device, modes=QUICK_MODES) -> Case:
    """Linear(n, n) + LIF on [T, 16, n] (open-neuromorphic.org's SNN library benchmark)."""
    lif = steps * BATCH * n * 4
    return Case(
        f"Linear({n},{n})+LIF T={steps}", (steps, BATCH, n), torch.float32, device,
        bytes_moved=_lif_bytes(lif, modes),
        providers=lambda: _layer_providers(steps, n, device, modes),
        bytes_note="the LIF part only, as above (the Linear's GEMM dominates)",
        baseline="spikingjelly",
    )


# ---- SpikingJelly's default step_mode 's': the network stepped once per time step ------------


def _single_step_neurons():
    """name -> (make a neuron, reset it) or (None, reason): pypaper's and SpikingJelly's LIFNode
    in step_mode 's' (both libraries' default), snntorch's Leaky (single-step by design)."""
    out = {"pypaper": (lambda: snn.LIFNode(tau=TAU, surrogate_function=snn.surrogate.ATan()),
                       snn.reset_net)}
    _, why = _spikingjelly()
    if why is None:
        from spikingjelly.activation_based import functional, neuron, surrogate

        out["spikingjelly"] = (lambda: neuron.LIFNode(tau=TAU, surrogate_function=surrogate.ATan()),
                               functional.reset_net)
    else:
        out["spikingjelly"] = (None, why)
    if importlib.util.find_spec("snntorch") is None:
        out["snntorch"] = (None, "snntorch is not installed")
    else:
        import snntorch
        from snntorch import surrogate as st_surrogate

        out["snntorch"] = (lambda: snntorch.Leaky(beta=1.0 - 1.0 / TAU, spike_grad=st_surrogate.atan(),
                                                  reset_mechanism="zero", init_hidden=True),
                           lambda m: m.reset_hidden())
    return out


def _single_step_providers(steps, n, device, modes) -> list:
    lin, x, xg, g, params = _linear_inputs(steps, n, device)
    out = []
    for name, (make_neuron, reset) in _single_step_neurons().items():
        if make_neuron is None:
            out.append(unavailable(name, reset))
            continue
        node = make_neuron().to(device)

        def run(t, node=node, reset=reset):
            reset(node)
            return torch.stack([node(lin(xt)) for xt in t.unbind(0)])

        out.append(_provider(name, run, x, xg, g, modes, params))
    return out


def single_step_case(steps, n, device, modes=QUICK_MODES) -> Case:
    """Linear(n, n) + LIF stepped T times from Python, one call per layer per step (a model
    written for SpikingJelly with its default step_mode 's'): the per-call cost of the op,
    its autograd and the module shows here, not the fused time loop."""
    lif = steps * BATCH * n * 4
    return Case(
        f"Linear({n},{n})+LIF single-step loop T={steps}", (steps, BATCH, n), torch.float32,
        device, bytes_moved=_lif_bytes(lif, modes),
        providers=lambda: _single_step_providers(steps, n, device, modes),
        bytes_note="the LIF part only, as above",
        baseline="spikingjelly",
    )


# ---- SLTT online training against BPTT: memory as T grows ------------------------------------


def _sltt_providers(steps, n, device) -> list:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n, n), snn.LIFNode(tau=TAU, surrogate_function=snn.surrogate.ATan(),
                                                        step_mode="m"),
                          nn.Linear(n, 10)).to(device)
    x = torch.rand(steps, BATCH, n, device=device)
    target = torch.randint(0, 10, (BATCH,), device=device)
    params = list(model.parameters())

    def loss_fn(out, y):  # per-step output [N, 10] (online) or the time mean (BPTT)
        return nn.functional.cross_entropy(out if out.dim() == 2 else out.mean(0), y)

    def bptt():
        snn.reset_net(model)
        loss = loss_fn(model(x), target)
        loss.backward()
        return loss

    def online():
        return snn.sltt.train_step_online(model, x, target, lambda o, y: loss_fn(o, y) / steps)

    def bptt_forward():
        snn.reset_net(model)
        return model(x)

    def online_step_forward():
        # what one online step keeps: the graph of one time step (the membrane is detached)
        neurons = [m for m in model.modules() if isinstance(m, snn.LIFNode)]
        for m in neurons:
            m.step_mode, m.sltt = "s", True
        try:
            snn.reset_net(model)
            return model(x[0])
        finally:
            for m in neurons:
                m.step_mode, m.sltt = "m", False
                m.reset()

    # x lives anyway (the caller's input): excluded as the parameters are. A step's first Linear
    # saves x[t], a view whose storage is all of x, which counted T steps of x for SLTT's one
    # step (0.63 / 2.13 / 8.13 MB at T = 8 / 32 / 128, where its own graph is 0.13 MB).
    lives = params + [x]
    p_bptt = Provider("pypaper-bptt", {"fwd+bwd": bptt},
                      saved_bytes=saved_bytes(bptt_forward, exclude=lives))
    p_sltt = Provider("pypaper-sltt-online", {"fwd+bwd": online},
                      saved_bytes=saved_bytes(online_step_forward, exclude=lives))
    return [p_bptt, p_sltt]


def sltt_case(steps, n, device) -> Case:
    return Case(
        f"train step Linear({n},{n})+LIF+Linear, BPTT vs SLTT online, T={steps}",
        (steps, BATCH, n), torch.float32, device, bytes_moved={"fwd+bwd": 5 * steps * BATCH * n * 4},
        providers=lambda: _sltt_providers(steps, n, device),
        bytes_note="the LIF part only; the saved-for-backward column is the point: BPTT keeps "
                   "every step, SLTT online one step",
        baseline="pypaper-bptt",
    )


# ---- a network of SpikingJelly's model zoo, as built and after pypaper.snn.convert -----------


def _zoo_neurons(channels: int) -> int:
    """PLIF neurons per sample of parametric_lif_net.MNISTNet: two conv stages (28x28, 14x14),
    Linear -> 2048 and Linear -> 100."""
    return channels * (28 * 28 + 14 * 14) + 2048 + 100


def _zoo_providers(steps, channels, device, modes) -> list:
    try:
        from spikingjelly.activation_based import functional, neuron, surrogate
        from spikingjelly.activation_based.model import parametric_lif_net
    except ImportError as e:  # SpikingJelly's model package also imports h5py
        why = f"SpikingJelly's model zoo does not import: {e}"
        return [unavailable("spikingjelly", why), unavailable("pypaper", why)]
    torch.manual_seed(0)
    built = parametric_lif_net.MNISTNet(channels=channels, spiking_neuron=neuron.ParametricLIFNode,
                                        surrogate_function=surrogate.ATan(), detach_reset=True)
    functional.set_step_mode(built, "m")
    built = built.to(device)
    converted = snn.convert(copy.deepcopy(built))
    x = torch.rand(steps, BATCH, 1, 28, 28, device=device)
    xg = x.detach().clone().requires_grad_()
    g = torch.randn(steps, BATCH, 10, device=device)

    def runner(model):
        def run(t):
            functional.reset_net(model)  # SpikingJelly's, as the model's training loop has it
            return model(t)
        return run

    return [_provider("pypaper", runner(converted), x, xg, g, modes, list(converted.parameters())),
            _provider("spikingjelly", runner(built), x, xg, g, modes, list(built.parameters()))]


def zoo_case(steps, channels, device, modes=QUICK_MODES) -> Case:
    """SpikingJelly's model zoo network parametric_lif_net.MNISTNet (Conv-BN-PLIF x2 with
    pooling, Linear-PLIF x2, VotingLayer; ATan, detach_reset) on [T, 16, 1, 28, 28]: the model
    as SpikingJelly builds it ("spikingjelly") and after pypaper.snn.convert ("pypaper"). The
    convolutions, BatchNorm and Linears are torch's in both."""
    lif = steps * BATCH * _zoo_neurons(channels) * 4
    return Case(
        f"zoo MNISTNet(PLIF, {channels} ch) built vs converted T={steps}",
        (steps, BATCH, 1, 28, 28), torch.float32, device, bytes_moved=_lif_bytes(lif, modes),
        providers=lambda: _zoo_providers(steps, channels, device, modes),
        bytes_note="the PLIF part only (the convolutions dominate)",
        baseline="spikingjelly",
    )


def cases(device: str = "cpu", quick: bool = False, numel: int = 1 << 23) -> list:
    """Quick: T = 32 with 2^18 neurons (the issue's figure), fp32, fwd and fwd+bwd,
    and the single-step loop (Linear(1024, 1024) + LIF, step_mode 's', T = 32).
    Full: T in {4, 8, 16, 32, 64} at 2^18 neurons, 2^16 and 2^20 at T = 32, bf16, the Linear+LIF
    shapes (T = 500, n in {512, 1024, 2048}), the single-step loop for n in {256, 1024, 4096}
    SLTT vs BPTT memory for T in {8, 32, 128}, the forward-mode jvp at T = 32, 2^18 neurons and
    the double backward at T = 32, 2^16 neurons, and SpikingJelly's zoo MNISTNet (PLIF, 32
    channels, T = 8) as built and converted.
    ``numel`` (neuron-steps) scales the quick case for smoke tests: neurons = numel / 32."""
    f32 = torch.float32
    if quick:
        return [lif_case(32, max(BATCH, numel // 32), f32, device, QUICK_MODES),
                single_step_case(32, 1024 if numel >= 1 << 20 else 64, device)]
    out = [lif_case(t, 1 << 18, f32, device) for t in (4, 8, 16, 32, 64)]
    out += [lif_case(32, 1 << 16, f32, device), lif_case(32, 1 << 20, f32, device),
            lif_case(32, 1 << 18, torch.bfloat16, device)]
    out += [layer_case(500, n, device) for n in (512, 1024, 2048)]
    out += [single_step_case(32, n, device) for n in (256, 1024, 4096)]
    out += [sltt_case(t, 1024, device) for t in (8, 32, 128)]
    out.append(jvp_case(32, 1 << 18, f32, device))
    out.append(second_order_case(32, 1 << 16, f32, device))
    out.append(zoo_case(8, 32, device))
    return out
