"""TrainConfig (the optimizer, the schedule, the step loop's periods, the mesh) and LossConfig
(the auxiliary losses' weights), each field declared once (``validation.declared``)."""

from __future__ import annotations

import dataclasses
import enum

from dynmoe_jax.validation import check_declared, declared, enum_value, int_at_least, number


class NonFinite(str, enum.Enum):
    SKIP = "skip"  # leave params and optimizer state as they were; count the step
    STOP = "stop"  # raise, keeping the checkpoints written before the step


def _in(low: float, high: float, closed_high: bool = False):
    if closed_high:
        return lambda v, _: number(v) and low <= v <= high
    return lambda v, _: number(v) and low <= v < high


_STEPS = ("an integer >= 1", int_at_least(1))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    num_train_steps: int = declared(700, "optimizer steps", *_STEPS)
    warmup_steps: int = declared(70, "linear warm-up steps", "an integer >= 0", int_at_least(0))
    learning_rate: float = declared(3e-3, "peak learning rate (AdamW)", "a number > 0",
                                    lambda v, _: number(v) and v > 0)  # fmt: skip
    min_learning_rate_ratio: float = declared(
        0.1, "cosine decay ends at this share of the peak", "0 <= ratio <= 1", _in(0, 1, True)
    )
    weight_decay: float = declared(0.1, "AdamW weight decay (norm scales are not decayed)",
                                   "a number >= 0", lambda v, _: number(v) and v >= 0)  # fmt: skip
    adam_b1: float = declared(0.9, "AdamW beta 1", "0 <= b1 < 1", _in(0, 1))
    adam_b2: float = declared(0.95, "AdamW beta 2", "0 <= b2 < 1", _in(0, 1))
    grad_clip_norm: float = declared(1.0, "global-norm clipping (0 = none)",
                                     "a number >= 0 (0 = no clipping)",
                                     lambda v, _: number(v) and v >= 0)  # fmt: skip
    grad_accum_steps: int = declared(1, "micro-batches per step", *_STEPS)
    log_every_steps: int = declared(25, "period of the train metrics", *_STEPS)
    eval_every_steps: int = declared(175, "period of validation", *_STEPS)
    checkpoint_every_steps: int = declared(175, "period of checkpoints", *_STEPS)
    keep_checkpoints: int = declared(3, "checkpoints kept (the newest)", *_STEPS)
    mesh_shape: str = declared("", "device mesh such as 'data=2,expert=4' ('' = one device)",
                               "a string such as 'data=2,expert=4'",
                               lambda v, _: isinstance(v, str))  # fmt: skip
    nonfinite: NonFinite = declared(NonFinite.SKIP, "a non-finite loss or gradient: skip the "
                                    "update (counted) | stop")  # fmt: skip

    def __post_init__(self):
        object.__setattr__(self, "nonfinite", enum_value(NonFinite, "nonfinite", self.nonfinite))
        check_declared(self)


def _weight(v, _) -> bool:
    return number(v) and v >= 0


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The auxiliary losses' weights: L = L_lm + w_b L_b + w_d L_d + w_z L_z, each aux loss
    averaged over the MoE layers."""

    load_balance_weight: float = declared(
        1e-2,
        "weight of the load balance N sum f_i Q_i (the paper: 1e-2)",
        "a number >= 0",
        _weight,
    )
    dynamic_weight: float = declared(1e-4, "weight of the dynamic loss, the router's entropy "
                                     "(the paper: 1e-4)", "a number >= 0", _weight)  # fmt: skip
    z_loss_weight: float = declared(0.0, "weight of the router z-loss (ST-MoE; not in the "
                                    "paper)", "a number >= 0", _weight)  # fmt: skip

    def __post_init__(self):
        check_declared(self, "loss.")
