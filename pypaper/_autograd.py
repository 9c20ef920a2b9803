"""register_autograd for every pypaper op: torch.library's, plus torch.func and forward-mode AD.

Each family registers its backward with ``pypaper._autograd.register_autograd(qualname, backward,
setup_context=...)``, the signature of ``torch.library.register_autograd``, and gets two kernels:

- **Autograd**: what torch.library registers (an autograd.Function whose forward redispatches below
  Autograd and calls setup_context; backward calls the registered backward), written here without
  its per-call costs, plus forward mode: torch.library's kernel runs a call whose inputs carry
  tangents (``torch.autograd.forward_ad``, ``torch.func.jvp``, ``jacfwd``) but do not require
  grad without autograd, so its outputs came back without a tangent: a jvp of zero, silently.
  Here an op with a forward-mode rule (``register_jvp``: the LIF op) computes its tangents with
  it; any other raises NotImplementedError naming the op and the argument.
- **FuncTorchDynamicLayerFrontMode**, the key torch.func transforms dispatch on. torch.library's
  Function has its context code inside ``forward(ctx, ...)``; functorch accepts only a Function
  with a ``setup_context`` staticmethod ("In order to use an autograd.Function with functorch
  transforms ... it must override the setup_context staticmethod": pytorch issues 168393, 170834,
  179652, open), so ``torch.func.grad`` over any custom op failed. Under ``grad`` / ``vjp`` /
  ``jacrev`` this kernel applies a Function in that form, built from the same setup_context and
  backward; under ``vmap`` it runs the op's batching rule (``register_vmap``: the LIF, quant and
  hopfield ops have one) or else the op once per sample (the batching fallback's loop): so
  per-sample gradients (``vmap(grad(...))``), ``functional_call`` + ``grad`` and ``jacrev`` work
  and equal autograd's.
"""
from __future__ import annotations

import inspect
import warnings
from typing import NamedTuple

import torch
from torch import _C
from torch._library import custom_ops as _custom_ops
from torch._library import utils as _library_utils
from torch._functorch import pyfunctorch as _pyfunctorch
from torch._functorch import vmap as _vmap
from torch.utils import _pytree
from torch.autograd import forward_ad

_LIBS: dict = {}  # namespace -> the torch.library.Library holding the kernels registered here


def _lib(namespace: str):
    if namespace not in _LIBS:
        _LIBS[namespace] = torch.library.Library(namespace, "FRAGMENT")
    return _LIBS[namespace]


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (torch.autograd.forward_ad.dual_level, which
    torch.func.jvp and jacfwd open too). A module global: costs nothing to ask per call."""
    return forward_ad._current_level >= 0


def values_of(t: torch.Tensor) -> torch.Tensor:
    """t without torch.func's wrappers (vmap's batched tensor, grad's): the values of every
    sample, which an argument check can read (``.item()`` / ``bool()`` of a batched tensor
    raises under vmap). Outside a transform, t itself."""
    while _C._functorch.is_functorch_wrapped_tensor(t):
        t = _C._functorch.get_unwrapped(t)
    return t


def refuse_tangents(op: str, names, values) -> None:
    """Raises NotImplementedError when a tensor among values (or in a list among them) carries a
    forward-mode tangent: op has no jvp, and the call would drop the tangent."""
    for name, v in zip(names, values):
        items = v if isinstance(v, (list, tuple)) else (v,)
        for t in items:
            if isinstance(t, torch.Tensor) and _carries_tangent(t):
                raise _no_jvp(op, name)


def _no_jvp(op: str, name: str) -> NotImplementedError:
    return NotImplementedError(
        f"{op} has no forward-mode AD rule (jvp), and its argument {name!r} carries a tangent "
        f"(torch.autograd.forward_ad / torch.func.jvp / jacfwd); use reverse mode: backward, "
        f"torch.autograd.grad, torch.func.grad / vjp / jacrev")


def fresh_output(t: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """t reshaped to ``shape`` in ``dtype``, as a tensor of its own. An op returns no views (the op
    contract; forward-mode AD through the op's autograd asserts on a view output, 'the tangent
    have the same layout as primal'): ``.reshape`` / ``.view`` of an internal result, or ``.to``
    of one already in ``dtype``, would return one. For the small outputs (parameter gradients);
    large ones are allocated in their shape. tests/conftest.py checks every opcheck'd op."""
    return torch.empty(shape, dtype=dtype, device=t.device).copy_(t.reshape(shape))


def _carries_tangent(t: torch.Tensor) -> bool:
    try:
        return forward_ad.unpack_dual(t).tangent is not None
    except RuntimeError:
        # a jvp level above a vmap (jacfwd, hessian's forward-over-reverse): unpack_dual has no
        # batching rule, so the tangent cannot be read; such a level's inputs carry one.
        return True


def has_tangent(values) -> bool:
    """Whether a tensor among values carries a forward-mode tangent at the current level."""
    return any(isinstance(t, torch.Tensor) and _carries_tangent(t) for t in values)


def _below_autograd(overload, keyset, args):
    """overload(*args) redispatched past the Autograd key (what every Autograd kernel here runs)."""
    with _C._AutoDispatchBelowAutograd():
        return overload.redispatch(keyset & _C._after_autograd_keyset, *args)


def _eager_function(overload, backward, setup_context, num_args):
    """The op as an old-style torch.autograd.Function (context set inside forward, as
    torch.library's generated one does: with a setup_context staticmethod every apply binds its
    arguments through inspect, ~9 us more on a 1-argument Function). Its first argument is the
    dispatch keyset to redispatch below Autograd with."""
    schema = overload._schema

    qualname = f"{overload._namespace}::{overload._opname}"

    def forward(ctx, keyset, *args):
        output = _below_autograd(overload, keyset, args)
        # the dispatcher drops trailing arguments equal to their defaults
        inputs = args if len(args) == num_args else _library_utils.fill_defaults(
            schema, args, {})[0]
        if setup_context is not None:
            setup_context(ctx=ctx, inputs=inputs, output=output)
        # (is_compiling: see autograd_kernel's second branch)
        if qualname in _JVP_RULES and (forward_ad._current_level >= 0
                                       or torch.compiler.is_compiling()):
            _save_for_jvp(ctx, inputs)
        return output

    def backward_(ctx, *grads):
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = needs[1:]  # the keyset's entry off: one per op input
        try:
            result = backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs
        return (None, *result) if isinstance(result, tuple) else (None, result)

    def jvp_(ctx, *tangents):  # tangents[0]: the keyset's
        if qualname not in _JVP_RULES:  # reached from a compiled graph (autograd_kernel)
            name = next(n for n, t in zip(_names(overload), tangents[1:]) if t is not None)
            raise _no_jvp(qualname, name)
        ctx.tangents_in = True  # for a backward that must know (see jvp_ran)
        return _JVP_RULES[qualname](_saved_for_jvp(ctx), tangents[1:])

    # grad_fn: <namespace>_<op>Backward, e.g. pypaper_lif_forwardBackward
    return type(f"{overload._namespace}_{overload._opname}", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward_),
        "jvp": staticmethod(jvp_),
    })


def _save_for_jvp(ctx, inputs) -> None:
    """Keeps the op's inputs for its jvp rule: the tensors through ctx.save_for_forward (which
    torch.func's jvp levels know how to carry), the rest as they are."""
    ctx.save_for_forward(*[a for a in inputs if isinstance(a, torch.Tensor)])
    ctx.jvp_inputs = tuple(a if not isinstance(a, torch.Tensor) else _TENSOR for a in inputs)


def _saved_for_jvp(ctx) -> tuple:
    """The inputs _save_for_jvp kept, in the op's argument order."""
    tensors = iter(ctx.saved_tensors)
    return tuple(next(tensors) if a is _TENSOR else a for a in ctx.jvp_inputs)


_TENSOR = object()  # _save_for_jvp's placeholder of a saved tensor


def jvp_ran(ctx) -> bool:
    """Whether the op's jvp rule ran for this call (its inputs carried tangents): a backward
    that cannot carry them over (e.g. one reading a non-differentiable saved output) can refuse.
    Inside the Function's forward the inputs show no tangents; the jvp runs after it."""
    return getattr(ctx, "tangents_in", False)


def _functorch_function(overload, backward, setup_context):
    """The op as a torch.autograd.Function in the form functorch's grad transform accepts. Under
    an outer vmap (per-sample gradients, jacrev) functorch vmaps the Function as a whole
    (generate_vmap_rule): its forward and backward then call the ops on batched tensors, which
    reach the ops' vmap path (_run_under_vmap)."""
    name = f"{overload._namespace}_{overload._opname}_functorch"

    def forward(*args):
        return overload(*args)

    qualname = f"{overload._namespace}::{overload._opname}"

    def setup(ctx, inputs, output):
        ctx.under_functorch = True  # a backward may tell this Function from the eager one
        if setup_context is not None:
            setup_context(ctx=ctx, inputs=inputs, output=output)
        if qualname in _JVP_RULES:
            _save_for_jvp(ctx, inputs)

    def jvp(ctx, *tangents):
        if qualname not in _JVP_RULES:
            # forward mode over this Function: torch.func.hessian / jacfwd(jacrev(f)) push
            # tangents through the op's forward (it ran under the grad level); without a rule
            # the lookup raised a bare KeyError naming the op
            name = next((n for n, t in zip(_names(overload), tangents) if t is not None),
                        "(an input)")
            raise _no_jvp(qualname, name)
        ctx.tangents_in = True
        return _JVP_RULES[qualname](_saved_for_jvp(ctx), tangents)

    return type(name, (torch.autograd.Function,), {
        "generate_vmap_rule": True,
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup),
        "backward": staticmethod(backward),
        "jvp": staticmethod(jvp),
    })


def _lowered_constant(interpreter, overload, args):
    """overload(*args) one transform level below a grad / jvp ``interpreter``, its outputs
    constants at that level (what functorch does with an op that has no autograd): the level's
    wrappers come off the arguments and go back on the outputs."""
    level = interpreter.level()

    def unwrap(t):
        return _C._functorch._unwrap_for_grad(t, level) if isinstance(t, torch.Tensor) else t

    def wrap(t):
        return _C._functorch._wrap_for_grad(t, level) if isinstance(t, torch.Tensor) else t

    unwrapped = _pytree.tree_map(unwrap, args)
    with interpreter.lower():
        out = overload(*unwrapped)
    return _pytree.tree_map(wrap, out)


def _run_under_vmap(interpreter, overload, args):
    """overload(*args) under the vmap transform ``interpreter``: through the op's batching rule
    (register_vmap) when it has one, else once per sample, one transform level down, outputs
    stacked along a new dim 0 (the batch dim of every output)."""
    level = interpreter.level()
    # Tensors a grad level saved and then exited (vjp / jacrev inside the vmap) still wear that
    # level's wrapper, through which unwrap_batched cannot see their batch dim: take it off
    # first, as torch's own autograd.Function path does (unwrap_dead_wrappers).
    args = _pytree.tree_map_only(torch.Tensor, _C._functorch.unwrap_if_dead, args)
    unwrapped, in_dims = _vmap.unwrap_batched(args, level)
    flat_dims = _pytree.tree_leaves(in_dims, is_leaf=lambda d: d is None)
    if all(d is None for d in flat_dims):  # nothing batched at this level
        with interpreter.lower():
            return overload(*unwrapped)
    rule = _VMAP_RULES.get(f"{overload._namespace}::{overload._opname}")
    if rule is not None:
        info = _VmapInfo(interpreter.batch_size(), interpreter.randomness())
        full, _ = _library_utils.fill_defaults(overload._schema, unwrapped, {})
        with interpreter.lower():
            result = rule(info, tuple(in_dims) + (None,) * (len(full) - len(in_dims)), *full)
        if result is not NotImplemented:
            out, out_dims = result
            return _vmap.wrap_batched(out, out_dims, level)

    if interpreter.batch_size() == 0:
        raise NotImplementedError(
            f"{overload._namespace}::{overload._opname} under vmap over zero samples: the op "
            f"runs once per sample here, and with none the outputs' shapes are unknown")

    def sample(i):
        return _pytree.tree_map(lambda a, d: a if d is None else a.select(d, i), unwrapped,
                                in_dims, is_leaf=lambda x: x is None)

    with interpreter.lower():
        outs = [overload(*sample(i)) for i in range(interpreter.batch_size())]
        stacked = _pytree.tree_map(lambda *o: torch.stack(o), *outs)
    return _vmap.wrap_batched(stacked, 0, level)


_VMAP_RULES: dict = {}  # qualname -> batching rule (register_vmap)
_JVP_RULES: dict = {}  # qualname -> forward-mode rule (register_jvp)
_RULES: dict = {}  # qualname -> (backward, setup_context) of the ops registered here
_FUNCTORCH_FNS: dict = {}  # qualname -> the Function of _functorch_function, built on first use
_COVERED: set = set()  # qualnames whose FuncTorchDynamicLayerFrontMode kernel is registered


def _names(overload):
    schema = overload._schema
    if any(a.kwarg_only for a in schema.arguments):
        raise NotImplementedError(f"{overload}: keyword-only arguments are not supported here")
    return [a.name for a in schema.arguments]


def _make_autograd_kernel(overload, backward, setup_context):
    qualname = f"{overload._namespace}::{overload._opname}"
    names = _names(overload)
    eager_fn = _eager_function(overload, backward, setup_context, len(names))

    # torch.library's kernel (torch/_library/autograd.py) without its per-call costs (an
    # out-variant check, a dataclass, the defaults filled in on every call): a 16-element op,
    # Zen 5 guest, 10.6 -> 8.0 us a call without grad, 15.9 -> 13.3 us forward with grad.
    def autograd_kernel(keyset, *args):
        if forward_ad._current_level >= 0:
            if qualname not in _JVP_RULES:
                refuse_tangents(qualname, names, args)
            elif has_tangent(args):
                return eager_fn.apply(keyset, *args)
        elif torch.compiler.is_compiling():
            # A compiled function that opens its own dual level (`with forward_ad.dual_level()`
            # inside it) is traced by AOT autograd with the level open in C++ only (the Python
            # _current_level stays -1), and unpack_dual cannot see a tangent through the
            # tracing's functional wrappers (pytorch#192629): the tangents came out None without
            # a word. Applied as the Function, autograd runs the jvp rule where tangents are
            # (and jvp_ refuses them for an op without one, as refuse_tangents does in eager).
            return eager_fn.apply(keyset, *args)
        if _C.is_grad_enabled() and _C._any_requires_grad(*args):
            return eager_fn.apply(keyset, *args)
        return _below_autograd(overload, keyset, args)

    return autograd_kernel


def _levels_of(t: torch.Tensor):
    """The functorch levels whose wrappers t wears, innermost first (vmap's and grad / jvp's)."""
    while _C._functorch.is_functorch_wrapped_tensor(t):
        yield _C._functorch.maybe_get_level(t)
        t = _C._functorch.get_unwrapped(t)


def wrapped_at(t: torch.Tensor, levels) -> bool:
    """Whether t wears a functorch wrapper of one of ``levels`` (tracked by or lifted into it)."""
    return any(lv in levels for lv in _levels_of(t))


def outer_forward_tracks(values, level: int) -> bool:
    """Whether a tensor among values (or in a list among them) wears the wrapper of a torch.func
    jvp level below ``level`` (an outer jvp / jacfwd around the one at ``level``). functorch
    lifts every tensor that an op inside nested levels touches into each of them, so a wrapper
    does not prove a nonzero outer tangent: callers that refuse on it err on the safe side."""
    outer = {i.level() for i in _pyfunctorch.retrieve_all_functorch_interpreters()
             if i.key() == _pyfunctorch.TransformType.Jvp and i.level() < level}
    if not outer:
        return False
    for v in values:
        for t in (v if isinstance(v, (list, tuple)) else (v,)):
            if isinstance(t, torch.Tensor) and wrapped_at(t, outer):
                return True
    return False


def refuse_nested_forward(op: str, values, level: int) -> None:
    """Raises NotImplementedError where a custom op's forward-mode rule would run under a jvp
    level (``level``) nested in another: jacfwd(jacfwd(f)), jvp(jvp(f)). torch runs an
    autograd.Function's jvp with forward AD off for the levels around it (its
    _SingleLevelFunction), so an outer level takes the inner tangents as constants: d/dx (J(x) v)
    and d/dv (J(x) v) come out 0 (pytorch#197867, open) - the LIF op's jacfwd(jacfwd) lost its
    sigma'' and reset terms, delay_linear's its terms in the positions, without an error.
    Reverse mode records the rule's ops, so the mixes with it (hessian = jacfwd(jacrev),
    jacrev(jacfwd), jacrev(jacrev)) are right and run. Conservative: an outer jvp whose
    variable does not reach the op is refused too (outer_forward_tracks)."""
    if outer_forward_tracks(values, level):
        raise NotImplementedError(
            f"{op} under nested forward-mode AD (a torch.func.jvp / jacfwd inside another, e.g. "
            f"jacfwd(jacfwd(f))): torch does not differentiate a custom op's forward-mode rule "
            f"a second time (pytorch#197867), so the result would be silently wrong. Take one "
            f"of the two levels in reverse mode: torch.func.hessian (= jacfwd(jacrev(f))), "
            f"jacrev(jacfwd(f)) or jacrev(jacrev(f))")


def _make_functorch_kernel(overload):
    """The op's kernel at FuncTorchDynamicLayerFrontMode, the key torch.func transforms dispatch
    on while one is active (it replaces, for this op, functorch's front fallback, which hands the
    call to the innermost transform):
    - grad / vjp / jacrev, an op with a backward: the op is applied as a Function here, outside
      any autograd kernel (inside one, functorch's custom_function_call no longer sees the
      transform). Its forward calls the op again one transform level down; with none left the
      call takes the Autograd kernel.
    - grad, an op without one (integer codes, sampling indices, norms used as constants): run one
      level down, its outputs constants at this level, as eager autograd treats them.
    - vmap: the op's batching rule (register_vmap), or else the op runs once per sample one
      level down and the outputs are stacked (what torch's batching fallback does for an op
      without a batching rule).
    - jvp / jacfwd: an op with a jvp rule (register_jvp) is applied as a Function with that
      jvp; any other is refused when a tangent reaches it, else run one level down.
    """
    qualname = f"{overload._namespace}::{overload._opname}"
    schema = overload._schema
    names = _names(overload)

    def functorch_kernel(*args):
        with_jvp = qualname in _JVP_RULES
        if forward_ad._current_level >= 0 and not with_jvp:
            refuse_tangents(qualname, names, args)
        interpreter = _pyfunctorch.retrieve_current_functorch_interpreter()
        kind = interpreter.key()
        if kind == _pyfunctorch.TransformType.Vmap:
            return _run_under_vmap(interpreter, overload, args)
        rule = _RULES.get(qualname)
        if kind == _pyfunctorch.TransformType.Jvp and with_jvp:
            refuse_nested_forward(qualname, args, interpreter.level())
        if rule is not None and (kind == _pyfunctorch.TransformType.Grad
                                 or (kind == _pyfunctorch.TransformType.Jvp and with_jvp)):
            fn = _FUNCTORCH_FNS.get(qualname)
            if fn is None:
                fn = _FUNCTORCH_FNS[qualname] = _functorch_function(overload, *rule)
            full, _ = _library_utils.fill_defaults(schema, args, {})
            return fn.apply(*full)
        if kind in (_pyfunctorch.TransformType.Grad, _pyfunctorch.TransformType.Jvp):
            return _lowered_constant(interpreter, overload, args)
        raise NotImplementedError(f"{qualname} does not support torch.func.{kind.name.lower()}")

    return functorch_kernel


def _quiet_impl(lib, name, kernel, key, **kw):
    """lib.impl, where the op may have a kernel at key already (a triton_op's own Autograd
    kernel): the dispatcher's warning that one was overridden (once per process) is expected.

    Library.impl refuses a second registration from Python at the same key ("This is not allowed
    since there's already a kernel registered from python overriding ...") unless
    allow_override: that argument defaults to False on torch 2.11 (every Triton family failed to
    import so on an H200 host with torch 2.11, 2026-12-04) and to True on later releases, so it
    is passed where it exists. Releases without it always refuse: the earlier registration's
    record is dropped there, as the dispatcher itself allows the override."""
    record = f"{lib.ns}/{name.split('::')[-1]}/{key or lib.dispatch_key}"
    dropped = False
    if "allow_override" in inspect.signature(lib.impl).parameters:
        kw.setdefault("allow_override", True)
    elif record in torch.library._impls:
        torch.library._impls.discard(record)
        dropped = True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore",
                                    message="(?s).*Overriding a previously registered kernel")
            lib.impl(name, kernel, key, **kw)
    except BaseException:
        if dropped:  # nothing was registered: the earlier registration stands, and its record
            torch.library._impls.add(record)
        raise


def register_functorch(qualname: str) -> None:
    """Registers the op's torch.func kernel (_make_functorch_kernel), once. Every pypaper
    triton_op gets it when defined (pypaper._triton.triton_op): a triton_op's own Autograd kernel
    fails under any transform; register_autograd gives it to the ops with a backward."""
    if qualname in _COVERED:
        return
    overload = _library_utils.lookup_op(qualname)
    _lib(overload._namespace).impl(overload._opname, _make_functorch_kernel(overload),
                                   "FuncTorchDynamicLayerFrontMode")
    _COVERED.add(qualname)


class _VmapInfo(NamedTuple):
    """What a batching rule learns of the vmap it runs under (torch.library's VmapInfo)."""
    batch_size: int
    randomness: str


def batch_first(t, dim, batch: int):
    """For batching rules: t with its vmap batch dim first, [batch, *sample shape]; an unbatched
    t (dim None) expanded to every sample (a view); None stays None."""
    if t is None:
        return None
    if dim is None:
        return t.unsqueeze(0).expand(batch, *t.shape)
    return t.movedim(dim, 0)


def sample_shape(t: torch.Tensor, dim) -> tuple:
    """For batching rules: the shape of one sample of t (t's shape without its batch dim)."""
    shape = list(t.shape)
    if dim is not None:
        del shape[dim]
    return tuple(shape)


def register_vmap(qualname: str, rule) -> None:
    """The op's batching rule, in torch.library.register_vmap's form: ``rule(info, in_dims,
    *args) -> (outputs, out_dims)``, where args are the op's arguments one vmap level down,
    in_dims their batch dims (None: unbatched) and info.batch_size the batch size; out_dims
    gives each output's batch dim (None: unbatched). Without one, or where the rule returns
    NotImplemented (a case it does not fold), vmap runs the op once per sample.
    (torch.library.register_vmap's own kernel is never reached: the functorch kernel of
    register_functorch takes the call first.)"""
    register_functorch(qualname)
    _VMAP_RULES[qualname] = rule


def register_autograd(qualname: str, backward, *, setup_context=None) -> None:
    """torch.library.register_autograd(qualname, backward, setup_context=setup_context), with an
    Autograd kernel that also refuses forward-mode tangents and a kernel for torch.func
    transforms (see the module docstring). qualname: "pypaper::<op>" (default overload), a
    schema op of csrc/schemas.cpp or a torch.library.triton_op."""
    overload = _library_utils.lookup_op(qualname)
    kernel = _make_autograd_kernel(overload, backward, setup_context)
    _RULES[qualname] = (backward, setup_context)
    _FUNCTORCH_FNS.pop(qualname, None)
    register_functorch(qualname)
    opdef = _custom_ops._maybe_get_opdef(qualname)
    if opdef is not None:
        # a triton_op keeps its backward on its CustomOpDef too (opcheck reads it there)
        opdef.register_autograd(backward, setup_context=setup_context)
    _quiet_impl(_lib(overload._namespace), overload._opname, kernel, "Autograd",
                with_keyset=True)


def register_jvp(qualname: str, rule) -> None:
    """The op's forward-mode AD rule: ``rule(inputs, tangents) -> output tangents``, where
    inputs are the op's arguments (defaults filled in; tensors without tangents), tangents one
    per argument (None where it has none) and the result one per output (a tensor of the
    output's shape; None only for an output setup_context marks non-differentiable). Then torch.autograd.forward_ad, torch.func.jvp and
    jacfwd (vmap over jvp) run through it instead of refusing the tangent. The op must have
    been registered with register_autograd. Where a reverse-mode graph is built over a call
    with tangents, the tangents are computed with differentiable torch ops by the rule, so
    reverse-over-forward works as far as the rule's own ops do; forward-over-reverse (the
    op's backward under a jvp, e.g. torch.func.hessian) needs a rule for the backward op too."""
    if qualname not in _RULES:
        raise ValueError(f"{qualname}: register_autograd first")
    _JVP_RULES[qualname] = rule


_CONSTANT: set = set()  # qualnames registered with register_constant


def register_constant(qualname: str) -> None:
    """An op whose outputs are not differentiable (integer codes, sampled indices and their
    weights): its Autograd kernel runs it below autograd, so its outputs never require grad and no
    graph node is made, and torch.func transforms treat them as constants. Without an Autograd
    kernel, torch's fallback for the C++ op made outputs that warn when backpropagated ("may
    lead to silently incorrect behavior", a deprecated path)."""
    overload = _library_utils.lookup_op(qualname)

    def kernel(keyset, *args):
        return _below_autograd(overload, keyset, args)

    register_functorch(qualname)
    _quiet_impl(_lib(overload._namespace), overload._opname, kernel, "Autograd",
                with_keyset=True)
    _CONSTANT.add(qualname)


def register_no_backward(qualname: str, reason: str) -> None:
    """An op with floating outputs and no backward (a step of another op's backward, or of a
    sampler that its callers run on detached inputs): differentiating through it raises
    NotImplementedError naming it and ``reason``, instead of torch's fallback for a C++ op
    without autograd (a warning and a zero gradient)."""
    def backward(ctx, *grads):
        raise NotImplementedError(f"{qualname} has no backward: {reason}")

    register_autograd(qualname, backward)
