"""Running a training function on Ray Train: strategies (ddp, deepspeed, accelerate), checkpoints, resume."""

from labtrain.train.runner import make_trainer, run
from labtrain.train.session import Restored, Session

__all__ = ["Restored", "Session", "make_trainer", "run"]
