"""TrainConfig (the optimizer, the schedule, the step loop's periods, the mesh) and LossConfig
(the auxiliary losses' weights), each field declared once (``validation.declared``)."""

from __future__ import annotations

import dataclasses
import enum
from typing import ClassVar

from dynmoe_jax.validation import Range, Text, check_declared, declared


class NonFinite(str, enum.Enum):
    SKIP = "skip"  # leave params and optimizer state as they were; count the step
    STOP = "stop"  # raise, keeping the checkpoints written before the step


_STEPS = Range(1)
_AT_LEAST_0 = Range(0, integer=False)
_FRACTION = Range(0, 1, integer=False, open_high=True)  # [0, 1)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    num_train_steps: int = declared(700, "optimizer steps", _STEPS)
    warmup_steps: int = declared(70, "linear warm-up steps", Range(0))
    learning_rate: float = declared(3e-3, "peak learning rate (AdamW)",
                                    Range(0, integer=False, open_low=True))  # fmt: skip
    min_learning_rate_ratio: float = declared(
        0.1, "cosine decay ends at this share of the peak", Range(0, 1, integer=False)
    )
    weight_decay: float = declared(0.1, "AdamW weight decay (norm scales are not decayed)",
                                   _AT_LEAST_0)  # fmt: skip
    adam_b1: float = declared(0.9, "AdamW beta 1", _FRACTION)
    adam_b2: float = declared(0.95, "AdamW beta 2", _FRACTION)
    grad_clip_norm: float = declared(1.0, "global-norm clipping (0 = none)",
                                     Range(0, integer=False, note="0 = no clipping"))  # fmt: skip
    grad_accum_steps: int = declared(1, "micro-batches per step", _STEPS)
    log_every_steps: int = declared(25, "period of the train metrics", _STEPS)
    eval_every_steps: int = declared(175, "period of validation", _STEPS)
    checkpoint_every_steps: int = declared(175, "period of checkpoints", _STEPS)
    keep_checkpoints: int = declared(3, "checkpoints kept (the newest)", _STEPS)
    mesh_shape: str = declared("", "device mesh such as 'data=2,expert=4' ('' = one device)",
                               Text("a string such as 'data=2,expert=4'"))  # fmt: skip
    nonfinite: NonFinite = declared(NonFinite.SKIP, "a non-finite loss or gradient: skip the "
                                    "update (counted) | stop")  # fmt: skip

    def __post_init__(self):
        check_declared(self)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The auxiliary losses' weights: L = L_lm + w_b L_b + w_d L_d + w_z L_z, each aux loss
    averaged over the MoE layers."""

    SECTION: ClassVar[str] = "loss"
    load_balance_weight: float = declared(
        1e-2, "weight of the load balance N sum f_i Q_i (the paper: 1e-2)", _AT_LEAST_0
    )
    dynamic_weight: float = declared(1e-4, "weight of the dynamic loss, the router's entropy "
                                     "(the paper: 1e-4)", _AT_LEAST_0)  # fmt: skip
    z_loss_weight: float = declared(0.0, "weight of the router z-loss (ST-MoE; not in the "
                                    "paper)", _AT_LEAST_0)  # fmt: skip

    def __post_init__(self):
        check_declared(self)
