"""Backend selection: defaults, PYPAPER_BACKEND, the context manager, explicit failures, fallback."""
import os
import subprocess
import sys

import pytest
import torch

import pypaper
from pypaper.quant import backend_for, fake_quantize


def test_default_on_cpu_is_the_cpp_kernel():
    assert backend_for(torch.randn(3)) == "cpu"


def test_context_manager_overrides_and_nests():
    x = torch.randn(3)
    with pypaper.use_backend("reference"):
        assert backend_for(x) == "reference"
        with pypaper.use_backend("cpu"):
            assert backend_for(x) == "cpu"
        assert backend_for(x) == "reference"
    assert backend_for(x) == "cpu"


def test_env_var(monkeypatch):
    monkeypatch.setenv("PYPAPER_BACKEND", "reference")
    assert backend_for(torch.randn(3)) == "reference"
    monkeypatch.setenv("PYPAPER_BACKEND", "bogus")
    with pytest.raises(ValueError, match="PYPAPER_BACKEND must be one of"):
        backend_for(torch.randn(3))


def test_env_var_is_read_on_every_call(monkeypatch):
    """_backend reads PYPAPER_BACKEND from the dict behind os.environ (no KeyError when it is
    unset): a change, a removal, padding and case, and an os.environ without that dict all count."""
    from pypaper import _backend

    x = torch.randn(3)
    monkeypatch.delenv("PYPAPER_BACKEND", raising=False)
    assert _backend.requested() is None
    monkeypatch.setenv("PYPAPER_BACKEND", " Reference ")
    assert _backend.requested() == "reference" and backend_for(x) == "reference"
    monkeypatch.setenv("PYPAPER_BACKEND", "cpu")
    assert _backend.requested() == "cpu"
    for unset in ("", "  ", "auto", "DEFAULT"):
        monkeypatch.setenv("PYPAPER_BACKEND", unset)
        assert _backend.requested() is None
    monkeypatch.delenv("PYPAPER_BACKEND")
    assert _backend.requested() is None and backend_for(x) == "cpu"

    class PlainEnviron(dict):  # what another Python's os.environ might be: no _data dict
        pass

    monkeypatch.setattr(os, "environ", PlainEnviron(PYPAPER_BACKEND="reference"))
    assert _backend.requested() == "reference"
    monkeypatch.setattr(os, "environ", PlainEnviron())
    assert _backend.requested() is None


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        with pypaper.use_backend("tpu"):
            pass


def test_explicit_request_that_cannot_run_raises_and_says_why():
    with pypaper.use_backend("cuda"):
        with pytest.raises(pypaper.BackendUnavailable, match="needs CUDA tensors"):
            fake_quantize(torch.randn(3), 0.1, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal of triton")
def test_triton_on_cpu_needs_the_interpreter():
    code = (
        "import torch, pypaper\n"
        "from pypaper.quant import fake_quantize\n"
        "try:\n"
        "    with pypaper.use_backend('triton'):\n"
        "        fake_quantize(torch.randn(3), 0.1, 0)\n"
        "except pypaper.BackendUnavailable as e:\n"
        "    print('REFUSED', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert "REFUSED" in out.stdout and "TRITON_INTERPRET" in out.stdout, out.stderr


def test_without_the_extension_ops_fall_back_to_reference_with_one_warning():
    code = (
        "import sys, warnings\n"
        "sys.modules['pypaper._C'] = None  # make the extension unloadable\n"
        "import torch, pypaper\n"
        "from pypaper.quant import fake_quantize, reference\n"
        "info = pypaper.build_info()\n"
        "assert info['extension_loaded'] is False and 'error' in info, info\n"
        "x = torch.randn(50)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    y = fake_quantize(x, 0.1, 0)\n"
        "    y2 = fake_quantize(x, 0.1, 0)\n"
        "assert sum('could not be loaded' in str(m.message) for m in w) == 1, [str(m.message) for m in w]\n"
        "assert torch.equal(y, reference.fake_quantize(x, torch.tensor(0.1), torch.tensor(0), -128, 127))\n"
        "try:\n"
        "    with pypaper.use_backend('cpu'):\n"
        "        fake_quantize(x, 0.1, 0)\n"
        "except pypaper.BackendUnavailable as e:\n"
        "    assert 'not loaded' in str(e)\n"
        "else:\n"
        "    raise AssertionError('explicit cpu request did not raise')\n"
        "print('OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("OK"), out.stderr


def test_build_info():
    info = pypaper.build_info()
    for key in ("compiler", "openmp", "openmp_max_threads", "simd", "cuda_kernels",
                "torch_version", "extension_loaded"):
        assert key in info, key
    assert info["extension_loaded"] is True
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert pypaper._C.build_info()["simd"] == info["simd"]


def test_import_does_not_load_triton_on_a_cpu_machine():
    """Importing triton takes seconds; it is loaded only where Triton kernels could run."""
    code = "import sys, pypaper; print('triton' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check; CUDA runs test_triton")
def test_public_api_on_the_triton_backend_under_the_interpreter():
    """fake_quantize with LSQ gradients and quantize/dequantize through use_backend('triton')
    give what the C++ backend gives (TRITON_INTERPRET=1 is set by conftest)."""
    from pypaper.quant import dequantize, quantize

    x = torch.randn(6, 40) * 2
    results = []
    for backend in ("cpu", "triton"):
        xx = x.clone().requires_grad_()
        s = torch.full((40,), 0.05, requires_grad=True)
        z = torch.full((40,), 3.0, requires_grad=True)
        with pypaper.use_backend(backend):
            y = fake_quantize(xx, s, z, 8, axis=1, symmetric=False)
            y.sum().backward()
            q = quantize(x, 4, group_size=8)
            qs = q.scale.clone().requires_grad_()
            q.scale = qs
            d = dequantize(q)
            d.sum().backward()
        results.append((y.detach(), xx.grad, s.grad, z.grad, q.data, d.detach(), qs.grad))
    a, b = results
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.allclose(u.double(), v.double(), rtol=1e-5, atol=1e-5), i


@pytest.mark.parametrize("module", ["pypaper.snn.ops", "pypaper.snn.delays",
                                    "pypaper.hopfield.ops", "pypaper.local.ops"])
def test_kernel_probes_trace_under_compile(module):
    """The backend choice asks whether pypaper._C has a kernel at a dispatch key. The dispatcher
    query itself cannot be traced: on an H200 (torch 2.11, 2026-12-04) a fullgraph compile of an
    SNN model failed on it; the families answer from a table probed at import."""
    import importlib

    m = importlib.import_module(module)

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return x + 1 if m._has_kernel("CUDA") else x - 1

    x = torch.randn(3)
    assert torch.equal(f(x), x + 1 if m._has_kernel("CUDA") else x - 1)


def _refusing_library(lib, override_param: bool, default: bool = False):
    """A Library whose impl refuses a second registration from Python at one key unless
    allow_override, as torch's does: with the parameter defaulting to ``default`` (torch 2.11:
    False), or without the parameter at all (always refuses)."""
    def register(op_name, fn, dispatch_key, with_keyset, allow_override):
        key = f"{lib.ns}/{op_name.split('::')[-1]}/{dispatch_key or lib.dispatch_key}"
        if not allow_override and key in torch.library._impls:
            raise RuntimeError("This is not allowed since there's already a kernel "
                               "registered from python overriding " + op_name)
        torch.library._impls.discard(key)  # allowed here: the installed torch may refuse too
        lib.impl(op_name, fn, dispatch_key, with_keyset=with_keyset)

    class Refusing:
        ns, dispatch_key = lib.ns, lib.dispatch_key
        if override_param:
            def impl(self, op_name, fn, dispatch_key="", *, with_keyset=False,
                     allow_override=default):
                register(op_name, fn, dispatch_key, with_keyset, allow_override)
        else:
            def impl(self, op_name, fn, dispatch_key="", *, with_keyset=False):
                register(op_name, fn, dispatch_key, with_keyset, False)

    return Refusing()


@pytest.mark.parametrize("override_param", [True, False], ids=["torch-2.11", "no-parameter"])
def test_quiet_impl_overrides_where_library_impl_refuses_by_default(override_param):
    """torch 2.11's Library.impl has allow_override=False by default and refuses a second
    registration from Python at one key (every Triton family's import failed so on an H200 host
    with torch 2.11); a Library.impl without the parameter always refuses. _quiet_impl overrides
    on both, as on later torch releases (where the default is True)."""
    from pypaper import _autograd

    name = f"pypaper_test_quiet_impl_{int(override_param)}"
    lib = torch.library.Library(name, "DEF")
    lib.define("scaled(Tensor x) -> Tensor")
    lib.impl("scaled", lambda x: x * 2, "CPU")
    # the record the refusal reads is the one the installed torch keeps for that registration
    assert f"{name}/scaled/CPU" in torch.library._impls

    refusing = _refusing_library(lib, override_param)
    with pytest.raises(RuntimeError, match="not allowed"):
        refusing.impl("scaled", lambda x: x * 3, "CPU")
    _autograd._quiet_impl(refusing, "scaled", lambda x: x * 3, "CPU")
    assert getattr(torch.ops, name).scaled(torch.ones(2)).tolist() == [3.0, 3.0]
    assert f"{name}/scaled/CPU" in torch.library._impls


def test_every_triton_family_launches_through_pypaper_wrap_triton():
    """torch.library.wrap_triton refuses interpreted kernels on torch 2.11: every family's Triton
    module launches through pypaper._triton.wrap_triton, which passes them as they are."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "pypaper"
    launching = []
    for path in sorted(root.rglob("*.py")):
        src = path.read_text()
        if path.name == "_triton.py" or "wrap_triton(" not in src:
            continue
        launching.append(path.relative_to(root).as_posix())
        assert re.search(r"from \.+_triton import wrap_triton\b", src), path
        assert "torch.library import wrap_triton" not in src, path
        assert "torch.library.wrap_triton" not in src, path
    assert len(launching) >= 8, launching  # snn, quant (4), wtacrs, hopfield, local
