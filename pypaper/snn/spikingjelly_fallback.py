"""The rest of SpikingJelly's modules, behind pypaper's: what pypaper.snn does not implement.

pypaper.snn.neuron / layer / surrogate / functional carry SpikingJelly's module names, so a model
switches library by changing one import line. pypaper fuses the neurons users spend their time in
(IF, LIF, PLIF), the stateless layers and the eight common surrogates; SpikingJelly has many
more (QIFNode, IzhikevichNode, PSN, LinearRecurrentContainer, S2NN, first_spike_index, ...).
A name pypaper's module lacks is looked up in SpikingJelly's module of the same name (PEP 562
module ``__getattr__``): the model still runs, those parts with SpikingJelly's own code and
speed, mixed with pypaper's (functional.reset_net / set_step_mode handle both). Without
spikingjelly installed the lookup fails with an AttributeError that says so.
"""
from __future__ import annotations

import importlib


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
