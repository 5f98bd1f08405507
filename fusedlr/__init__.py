"""fusedlr: AMP unscaling, global-norm clipping, an on-device LR schedule and AdamW in two passes."""

from .optimizer import AdamW
from .schedules import SCHEDULE_NAMES, Schedule, get_schedule

__all__ = ["AdamW", "Schedule", "get_schedule", "SCHEDULE_NAMES"]
__version__ = "0.1.0"
