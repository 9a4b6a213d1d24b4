"""memwise plugin: GaLore and Natural GaLore (Adam states of low-rank projected gradients)."""

from memwise_galore.optimizer import GaLoreAdamW, galore_state_bytes, natural_gradient
from memwise_galore.plugin import GaLorePlugin
from memwise_galore.projection import project, project_back, projector
from memwise_galore.subspace import projected_parameters

__all__ = ["GaLoreAdamW", "GaLorePlugin", "galore_state_bytes", "natural_gradient", "project", "project_back",
           "projected_parameters", "projector"]
