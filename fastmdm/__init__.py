"""fastmdm: masked diffusion models with learned per-column noise schedules for tables."""
from . import datasets, ops
from .api import TabularMDM
from .data import TableCodec
from .objective import LossOutput, diffusion_loss
from .schedules import PowerSchedule

__version__ = "0.1.0"
__all__ = ["ops", "datasets", "TabularMDM", "TableCodec", "PowerSchedule", "diffusion_loss",
           "LossOutput", "__version__"]
