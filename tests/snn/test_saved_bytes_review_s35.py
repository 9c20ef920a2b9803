"""The LIF neurons' memory contract (issue 3), measured with saved_tensors_hooks: what one neuron
call keeps for its backward is at most one value per neuron-step in the input's dtype (x on the
CPU, whose backward reruns the forward from it; H on GPUs), plus the carried membrane [N, *] and
the parameters (one value, or one per feature). Each storage is counted once, at its full size
(a view keeps its whole base alive); tensors that live anyway (parameters, the caller's leaf
input) are not counted, but any copy of them is."""
import pytest
import torch

from pypaper.snn import neuron

T, N, F = 6, 16, 7  # N * F well above the per-feature terms: a [N, F] too many is seen


class KeptStorages:
    """Bytes of the distinct storages autograd keeps for the backward, ``exclude``'s left out."""

    def __init__(self, exclude=()):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages = {}

    def _pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self._excluded:
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    @property
    def total(self):
        return sum(self.storages.values())

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


# ---- the regression: a sliced input kept its whole base ------------------------------------

def test_sliced_input_keeps_one_value_per_neuron_step_not_its_base():
    """lif(linear(x)[..., :F]) of an 8F-wide projection: the neuron kept the slice view, whose
    storage is the whole projection (8 values per neuron-step; torch.compile's graph too), and
    the kernels copied it in the forward and again in the backward. It keeps a compact copy."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(F, 8 * F)
    x = torch.randn(T, N, F)

    def f(node, x):
        return node(lin(x)[..., :F])

    one_value = T * N * F * 4
    for run in (f, torch.compile(f)):
        node = neuron.LIFNode(step_mode="m")
        with KeptStorages([x, *lin.parameters()]) as kept:
            out = run(node, x)
        out.sum().backward()
        assert kept.total <= one_value + 64, kept.total
    # the same spikes and gradients as from a contiguous input
    y = lin(x).detach().requires_grad_()
    node = neuron.LIFNode(step_mode="m")
    out = node(y[..., :F])
    (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
    yc = y.detach()[..., :F].contiguous().requires_grad_()
    node.reset()
    ref = node(yc)
    (ref * torch.arange(ref.numel()).reshape(ref.shape)).sum().backward()
    assert torch.equal(out, ref)
    assert torch.equal(y.grad[..., :F], yc.grad) and not y.grad[..., F:].any()


def test_channel_split_of_a_sequence_keeps_its_half_only():
    """[T, N, C, H, W] split along the channels (y.chunk(2, dim=2)): the half fed to the
    neuron has gaps that no permutation closes; the neuron keeps that half, not the whole y."""
    y = torch.randn(T, 2, 8, 3, 3) * 1.0  # a non-leaf: nothing else keeps it
    y.requires_grad_()
    half = (y * 2.0).chunk(2, dim=2)[0]
    node = neuron.LIFNode(step_mode="m")
    with KeptStorages([y]) as kept:
        node(half)
    assert kept.total <= half.numel() * 4 + 64, kept.total


def test_broadcast_input_keeps_the_smaller_view():
    """A static input expanded over the T steps (stride 0 in time) is kept as the view: its
    base holds one step, T times fewer values than a copy would."""
    base = (torch.randn(1, N, F, requires_grad=True) * 1.0)
    x_seq = base.expand(T, N, F)
    node = neuron.LIFNode(step_mode="m")
    with KeptStorages() as kept:
        out = node(x_seq)
    out.sum().backward()
    assert kept.total <= N * F * 4 + 64, kept.total


# ---- the contract across what the modules build --------------------------------------------

_NODES = {
    "lif": lambda: neuron.LIFNode(),
    "lif_soft": lambda: neuron.LIFNode(v_reset=None),
    "lif_detach_reset": lambda: neuron.LIFNode(detach_reset=True),
    "lif_no_decay_input": lambda: neuron.LIFNode(decay_input=False),
    "lif_tensor_tau": lambda: neuron.LIFNode(tau=torch.linspace(1.5, 4.0, F)),
    "lif_threshold": lambda: neuron.LIFNode(learnable_threshold=True),
    "lif_threshold_per_neuron": lambda: neuron.LIFNode(learnable_threshold=True,
                                                       threshold_shape=(F,)),
    "lif_store_v_seq": lambda: neuron.LIFNode(store_v_seq=True),
    "lif_sltt": lambda: neuron.LIFNode(sltt=True),
    "plif": lambda: neuron.ParametricLIFNode(),
    "plif_per_neuron": lambda: neuron.ParametricLIFNode(tau_shape=(F,), learnable_threshold=True,
                                                        threshold_shape=(F,)),
    "if": lambda: neuron.IFNode(),
    "if_soft": lambda: neuron.IFNode(v_reset=None, detach_reset=True),
}


def _bound(node, dtype, steps, calls, carried):
    """One value per neuron-step in x's dtype, V[t] as well where store_v_seq asks for it, a
    carried membrane [N, F] per call, and per call a few per-feature parameter tensors (in
    float32: the math type) and scalars."""
    size = torch.finfo(dtype).bits // 8
    per_step = size * N * F * (2 if node.store_v_seq else 1)
    return steps * per_step + calls * (size * N * F * carried + 4 * 4 * F + 64)


def _input(dtype, layout):
    torch.manual_seed(0)
    leaf = (torch.randn(T, N, F) * 1.5).to(dtype).requires_grad_()
    if layout == "nonleaf":  # an activation nothing else keeps (a mul by a number saves nothing)
        return leaf, leaf * 1.0
    if layout == "transposed":  # a permutation of a dense tensor: run in its own layout
        return leaf, (leaf.transpose(1, 2) * 1.0).transpose(1, 2)
    return leaf, leaf


@pytest.mark.parametrize("layout", ["leaf", "nonleaf", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("carry", [False, True])
@pytest.mark.parametrize("name", sorted(_NODES))
def test_multi_step_call_keeps_at_most_one_value_per_neuron_step(name, carry, dtype, layout):
    node = _NODES[name]().to(dtype)
    node.step_mode = "m"
    leaf, x_seq = _input(dtype, layout)
    if carry:  # the membrane of a previous call, in the graph or (v_init requires grad) a leaf
        node(x_seq.detach())
        if name == "lif":
            node.v = node.v.detach().requires_grad_()
    exclude = [*node.parameters(), leaf]
    with KeptStorages(exclude) as kept:
        out = node(x_seq)
    out.float().sum().backward()
    # a leaf input is the caller's: only what the op adds counts
    steps = 0 if layout == "leaf" else T
    assert kept.total <= _bound(node, dtype, steps, 1, carry), (kept.total, kept.storages)
    if layout != "leaf":  # the measurement sees x: it would see H kept beside it
        assert kept.total >= T * N * F * (torch.finfo(dtype).bits // 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["lif", "lif_soft", "lif_tensor_tau", "plif_per_neuron", "if"])
def test_single_step_calls_keep_one_membrane_per_call(name, dtype):
    """step_mode 's' over T calls on the caller's sequence: per call the carried membrane
    [N, *] (the backward reruns the step from x[t] and it), nothing per neuron-step beyond."""
    node = _NODES[name]().to(dtype)
    leaf, _ = _input(dtype, "leaf")
    with KeptStorages([*node.parameters(), leaf]) as kept:
        out = torch.stack([node(leaf[t]) for t in range(T)])
    out.float().sum().backward()
    assert kept.total <= _bound(node, dtype, 0, T, True), (kept.total, kept.storages)


def test_compiled_call_keeps_one_value_per_neuron_step():
    """torch.compile (inductor): the compiled graph's saved tensors are the eager call's."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(F, F).to(torch.bfloat16)
    node = neuron.ParametricLIFNode(step_mode="m", tau_shape=(F,)).to(torch.bfloat16)
    run = torch.compile(lambda x: node(lin(x)))
    x = torch.randn(T, N, F, dtype=torch.bfloat16)
    for _ in range(2):  # the second call carries the membrane
        with KeptStorages([x, *lin.parameters(), *node.parameters()]) as kept:
            out = run(x)
        out.float().sum().backward()
        node.detach()
        assert kept.total <= _bound(node, torch.bfloat16, T, 1, True), kept.storages
