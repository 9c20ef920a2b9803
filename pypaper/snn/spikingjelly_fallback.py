"""The rest of SpikingJelly's modules, behind pypaper's: what pypaper.snn does not implement.

pypaper.snn.neuron / layer / surrogate / functional carry SpikingJelly's module names, so a model
switches library by changing one import line. pypaper fuses the neurons users spend their time in
(IF, LIF, PLIF), the stateless layers and the eight common surrogates; SpikingJelly has many
more (QIFNode, IzhikevichNode, PSN, LinearRecurrentContainer, S2NN, first_spike_index, ...).
A name pypaper's module lacks is looked up in SpikingJelly's module of the same name (PEP 562
module ``__getattr__``): the model still runs, those parts with SpikingJelly's own code and
speed, mixed with pypaper's (functional.reset_net / set_step_mode handle both). Without
spikingjelly installed the lookup fails with an AttributeError that says so.

The package pypaper.snn does the same for SpikingJelly's modules it has none of (encoding,
monitor, learning, rnn, ...; package_forwarder), all but memopt, which cannot checkpoint
pypaper's neurons and is refused with the reason.
"""
from __future__ import annotations

import importlib
import importlib.util


def _star_names(module) -> list:
    """What ``from module import *`` binds: its __all__, else its names without a leading _."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    return list(names)


def forwarder(module_name: str, submodule: str, own: list):
    """A module ``__getattr__`` for pypaper.snn.<submodule>: public names it lacks come from
    spikingjelly.activation_based.<submodule>, imported on the first such lookup. ``__all__``
    (which ``from pypaper.snn.<submodule> import *`` reads) is ``own`` (pypaper's names) followed
    by the names SpikingJelly's module would star-import, when it imports: the names a model
    star-imported from SpikingJelly are all there after the import line changes."""
    source = f"spikingjelly.activation_based.{submodule}"

    def __getattr__(name: str):
        if name == "__all__":
            try:
                sj = importlib.import_module(source)
            except Exception:  # not installed, or a broken install: pypaper's names alone
                return list(own)
            return list(own) + [n for n in _star_names(sj) if n not in own]
        if name.startswith("_"):  # dunders and private names: probed by tools, never forwarded
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        try:
            sj = importlib.import_module(source)
        except Exception as e:  # not installed, or a broken install
            raise AttributeError(
                f"module {module_name!r} has no attribute {name!r}: pypaper does not implement it, "
                f"and {source} (where it would come from) failed to import "
                f"({type(e).__name__}: {e})") from None
        try:
            return getattr(sj, name)
        except AttributeError:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}, and neither "
                                 f"has {source}") from None

    return __getattr__


def package_forwarder(package_name: str):
    """A module ``__getattr__`` for the package pypaper.snn: SpikingJelly's other modules, those
    pypaper has no module for (encoding, monitor, learning, rnn, model, ...), come from
    spikingjelly.activation_based. An import line of SpikingJelly's example scripts,
    ``from spikingjelly.activation_based import neuron, encoding, functional, surrogate, layer``,
    then runs changed to ``from pypaper.snn import ...``: pypaper's neuron, functional,
    surrogate and layer, SpikingJelly's encoding (it raised ImportError). pypaper's own
    submodules (imported or not) are always pypaper's. Attribute access and ``from pypaper.snn
    import encoding`` only: a dotted import through pypaper.snn (``from pypaper.snn.encoding
    import PoissonEncoder``, ``from pypaper.snn.model import ...``) is not provided; such lines
    keep naming spikingjelly.activation_based.

    Not memopt: SpikingJelly's memopt (optimize_memory, checkpoint_module) keeps and restores
    for its recompute only the state of SpikingJelly's MemoryModules, so it recomputes pypaper's
    neurons from the membrane their forward left (its temporal chunks: silently wrong
    gradients; a neuron followed by other layers in one checkpointed block: torch's
    CheckpointError). ``from pypaper.snn import memopt`` raises an ImportError that says so."""
    source = "spikingjelly.activation_based"

    def __getattr__(name: str):
        if name.startswith("_"):
            raise AttributeError(f"module {package_name!r} has no attribute {name!r}")
        if name == "memopt":
            raise ImportError(
                f"{package_name} has no memopt: SpikingJelly's memopt (optimize_memory, "
                f"checkpoint_module) restores only SpikingJelly's MemoryModule state for its "
                f"recompute, and would recompute pypaper's neurons from the wrong membrane "
                f"(temporal chunks: wrong gradients; a neuron followed by other layers in one "
                f"checkpointed block: CheckpointError). Keep SpikingJelly's neurons in a model "
                f"given to memopt (from spikingjelly.activation_based import memopt, neuron), or "
                f"checkpoint blocks with pypaper.snn.functional.checkpoint, which restores "
                f"the neurons' state", name=f"{package_name}.memopt")
        own = f"{package_name}.{name}"
        if importlib.util.find_spec(own) is not None:  # a submodule of pypaper's not imported yet
            return importlib.import_module(own)
        try:
            found = importlib.util.find_spec(f"{source}.{name}") is not None
        except Exception as e:  # spikingjelly not installed, or a broken install
            raise AttributeError(
                f"module {package_name!r} has no attribute {name!r}: pypaper has no such module, "
                f"and {source} (where SpikingJelly's would come from) failed to import "
                f"({type(e).__name__}: {e})") from None
        if not found:
            raise AttributeError(f"module {package_name!r} has no attribute {name!r}, and "
                                 f"{source} has no module {name!r}")
        return importlib.import_module(f"{source}.{name}")

    return __getattr__
