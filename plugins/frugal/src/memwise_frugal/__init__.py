"""memwise plugin: FRUGAL (Adam on a state-full gradient subspace, signSGD on the rest)."""

from memwise_frugal.optimizer import FrugalAdamW, frugal_state_bytes
from memwise_frugal.plugin import FrugalPlugin

__all__ = ["FrugalAdamW", "FrugalPlugin", "frugal_state_bytes"]
