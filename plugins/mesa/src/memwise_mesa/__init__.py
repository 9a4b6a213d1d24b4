"""Mesa for memwise: activations saved for backward in 8 bits with learned per-group ranges.

Functional API: ``apply_mesa(model)`` (convert in place, returns a ``MesaReport``),
``revert_mesa``, ``ranges_state_dict`` / ``load_ranges_state_dict``, ``generic_mesa``
(saved-tensor hooks for any model), ``rounding`` (the stochastic-rounding stream: save
``rounding.state_dict()`` with a checkpoint for an exact resume). ``MesaPlugin`` is the
memwise plugin.
"""

from memwise_mesa import rounding
from memwise_mesa.convert import (MesaReport, apply_mesa, load_ranges_state_dict, plan_mesa, ranges_state_dict,
                                  revert_mesa)
from memwise_mesa.generic import generic_mesa
from memwise_mesa.plugin import MesaPlugin
from memwise_mesa.quantizer import RangeQuantizer

__all__ = ["MesaPlugin", "MesaReport", "RangeQuantizer", "apply_mesa", "generic_mesa", "load_ranges_state_dict",
           "plan_mesa", "ranges_state_dict", "revert_mesa", "rounding"]
