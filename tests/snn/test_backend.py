"""Backend selection of the LIF op: C++ by default on CPU, the reference on request or for custom
surrogates; explicit requests that cannot run raise and say why."""
import pytest
import torch

import pypaper
from pypaper.snn import backend_for, lif_multi_step, reference, surrogate


def _lif_op_calls(fn):
    """How many times the C++ op pypaper::lif_forward ran during fn()."""
    calls = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.pypaper.lif_forward.default:
                calls.append(func)
            return func(*args, **(kwargs or {}))

    with Spy():
        out = fn()
    return len(calls), out


def test_default_on_cpu_is_the_cpp_kernel_and_reference_on_request():
    x = torch.randn(4, 3, 5) + 0.5
    assert backend_for(x) == "cpu"
    with pypaper.use_backend("reference"):
        assert backend_for(x) == "reference"
        n_ref, want = _lif_op_calls(lambda: lif_multi_step(x, store_v_seq=True))
    n, got = _lif_op_calls(lambda: lif_multi_step(x, store_v_seq=True))
    assert (n, n_ref) == (1, 0)  # the default ran the C++ op, the request the reference
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_cached_default_never_hides_a_later_request(monkeypatch):
    """The default backend is chosen once per device; a request made after that still wins."""
    x = torch.randn(3, 4) + 0.5
    assert backend_for(x) == "cpu" and backend_for(x) == "cpu"
    monkeypatch.setenv("PYPAPER_BACKEND", "reference")
    assert backend_for(x) == "reference"
    monkeypatch.setenv("PYPAPER_BACKEND", "cuda")
    with pytest.raises(pypaper.BackendUnavailable, match="needs CUDA tensors"):
        lif_multi_step(x)
    monkeypatch.delenv("PYPAPER_BACKEND")
    assert backend_for(x) == "cpu"


def test_explicit_requests_that_cannot_run_say_why():
    x = torch.randn(3, 4)
    with pypaper.use_backend("cuda"):
        with pytest.raises(pypaper.BackendUnavailable, match="needs CUDA tensors"):
            lif_multi_step(x)



def test_missing_twins_are_reported_with_a_reason(monkeypatch):
    """Without a Triton module or a registered CUDA kernel, those backends say so (and the
    automatic choice on a GPU falls through to the next one)."""
    from pypaper.snn import ops

    real = ops.importlib.util.find_spec
    monkeypatch.setattr(ops.importlib.util, "find_spec",
                        lambda name, *a: None if name.endswith("triton_kernels") else real(name, *a))
    assert "no Triton kernel" in ops._triton_reason(torch.device("cpu"))
    monkeypatch.setattr(ops, "_has_kernel", lambda key: False)
    monkeypatch.setattr(ops._backend, "native_reason", lambda d, name: None)
    assert "no CUDA kernel" in ops._cuda_reason(torch.device("cuda"))
    assert ops._backend.select(torch.device("cuda"), ops._DEFAULT_ORDER["cuda"],
                               ops._REASONS) == "reference"


def test_custom_surrogate_callable_runs_the_reference_loop():
    """Any spike function works (plain PyTorch, one call per step); a callable that is ATan
    under another name gives the kernel's ATan results."""
    x = (torch.randn(6, 4, 7, dtype=torch.float64) + 0.6)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    sa, va, _ = lif_multi_step(xa, surrogate_function=lambda z: reference.spike(z, 1, 2.0))
    sb, vb, _ = lif_multi_step(xb, surrogate_function=surrogate.ATan())
    assert torch.equal(sa, sb) and torch.equal(va, vb)
    (sa.sum() + va.sum()).backward()
    (sb.sum() + vb.sum()).backward()
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)
