"""fastmdm: masked diffusion models with learned per-column noise schedules for tables."""
from . import ops
from .objective import LossOutput, diffusion_loss
from .schedules import PowerSchedule

__version__ = "0.1.0"
__all__ = ["ops", "PowerSchedule", "diffusion_loss", "LossOutput", "__version__"]
