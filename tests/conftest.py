"""Test setup: Triton kernels run under the interpreter on CPU tensors when no GPU is present.
TRITON_INTERPRET must be set before any @triton.jit decorator runs, hence here, first."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import pypaper  # noqa: E402,F401

if os.environ.get("PYPAPER_TRITON_LAUNCHES") and os.environ.get("TRITON_INTERPRET") == "1":
    # Record every interpreted Triton launch, for tools/triton_compile_check.py to compile them
    # for NVIDIA GPUs afterwards (tools/dev.sh test does both).
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
    import triton_compile_check  # noqa: E402

    triton_compile_check.start_recording(os.environ["PYPAPER_TRITON_LAUNCHES"])

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def vmap_calls(monkeypatch):
    """How often each batching rule (pypaper/_autograd.py register_vmap) folded a call: a dict
    qualname -> count of the calls it did not hand back as NotImplemented. The Triton twins'
    rules are registered when their modules load: those are loaded first, where Triton is."""
    from pypaper import _autograd
    from pypaper.hopfield import _registration as hopfield_registration
    from pypaper.snn import _registration as snn_registration

    for load in (hopfield_registration.load_triton, snn_registration.load_triton):
        try:
            load()
        except ImportError:
            pass
    counts = {}
    for name, rule in list(_autograd._VMAP_RULES.items()):
        def counted(info, in_dims, *args, _rule=rule, _name=name):
            out = _rule(info, in_dims, *args)
            if out is not NotImplemented:
                counts[_name] = counts.get(_name, 0) + 1
            return out

        monkeypatch.setitem(_autograd._VMAP_RULES, name, counted)
    return counts


# ---- the op contract's "outputs are no views", checked at every opcheck ---------------------------
# An op must return tensors of its own: a view of an internal tensor (x.view(...) of a result
# computed flat, say) breaks forward-mode AD through the op's autograd (autograd asserts 'the tangent
# have the same layout as primal'; the delay op's dense path, 2026-12-05). torch.library.opcheck
# does not look for it, so every opcheck in the suite also calls the op on copies of its arguments
# and checks each output, on every backend the suite reaches (CPU, CUDA, Triton).
_torch_opcheck = torch.library.opcheck


def _copy_arg(a):
    if isinstance(a, torch.Tensor):
        return a.detach().clone().requires_grad_(a.requires_grad)
    return a


def assert_no_view_outputs(op, args, kwargs=None):
    from torch.utils import _pytree

    args, kwargs = _pytree.tree_map(_copy_arg, (tuple(args), dict(kwargs or {})))
    out = op(*args, **kwargs)
    views = [i for i, t in enumerate(_pytree.tree_leaves(out))
             if isinstance(t, torch.Tensor) and t._is_view()]
    assert not views, f"{op}: outputs {views} are views (an op must return tensors of its own)"


def _opcheck_and_no_views(op, args, kwargs=None, *pos, **kw):
    result = _torch_opcheck(op, args, kwargs, *pos, **kw)
    assert_no_view_outputs(op, args, kwargs)
    return result


torch.library.opcheck = _opcheck_and_no_views
