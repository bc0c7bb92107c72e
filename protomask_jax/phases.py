"""Training phases: which parameter groups move, at which learning rates, for how long.

The reference trains in three phases selected by epoch (reference doc §5.2): warmup (the
prototypes, backbone frozen), joint (backbone and prototypes, StepLR on both), fine-tune
(the last layer only). Each phase has its own Adam optimizer (fused, betas 0.9/0.999,
eps 1e-8, no weight decay) and gradient accumulation over ``accumulate_steps`` batches.
Optional pruning adds a last-layer fine-tune after it ("prune_finetune", no accumulation).

Frozen groups get ``optax.set_to_zero`` and, in the step, ``stop_gradient`` — so XLA does not
even compute their gradients (fine-tuning never back-propagates through the backbone).
"""

from __future__ import annotations

import dataclasses
import math

import optax

from protomask_jax.models.protomask import PARAM_GROUPS, param_group_labels

WARMUP = "warmup"
JOINT = "joint"
FINETUNE = "finetune"
PRUNE_FINETUNE = "prune_finetune"


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of the schedule, in global steps (one step = one global batch).

    Attributes:
      name: warmup | joint | finetune | prune_finetune.
      first_step: global step at which the phase starts.
      num_steps: its length in steps.
      learning_rates: learning rate per trained parameter group; groups absent are frozen.
      accumulate_steps: batches per optimizer update.
      lr_decay_steps: optimizer updates between halvings (StepLR), 0 for none.
      lr_gamma: StepLR factor.
      loss_phase: the loss variant (``warmup``/``joint`` or ``finetune``).
      bn_train: BatchNorm in training mode (batch statistics, running averages move).
    """

    name: str
    first_step: int
    num_steps: int
    learning_rates: dict[str, float]
    accumulate_steps: int
    lr_decay_steps: float = 0
    lr_gamma: float = 1.0
    loss_phase: str = JOINT
    bn_train: bool = True

    @property
    def end_step(self) -> int:
        return self.first_step + self.num_steps

    @property
    def trainable(self) -> tuple[str, ...]:
        return tuple(g for g in PARAM_GROUPS if g in self.learning_rates)


def steps_per_epoch(num_train_images: int, global_batch: int) -> int:
    """Steps covering every training image at least once (the stream never drops one)."""
    return max(1, math.ceil(num_train_images / global_batch))


def plan_phases(config, num_train_images: int, *, pruned: bool = False) -> list[Phase]:
    """The phase schedule for ``config`` on a training split of ``num_train_images``.

    Args:
      config: the full config (``train.*``, ``input.batch_size``).
      num_train_images: size of the training split (validation excluded).
      pruned: include the post-pruning fine-tune (``train.prune.enabled``).

    Returns:
      Phases in order, only those with at least one step.
    """
    t = config.train
    epoch = steps_per_epoch(num_train_images, config.input.batch_size)
    accumulate = t.accumulate_steps
    train_addon = not t.reference_frozen_addon
    warm_rates = {"prototypes": t.warmup_lr}
    joint_rates = {"backbone": t.backbone_lr, "prototypes": t.prototype_lr}
    if train_addon:
        warm_rates["add_on"] = t.warmup_lr
        joint_rates["add_on"] = t.addon_lr
    specs = [
        (WARMUP, t.warmup_epochs, warm_rates, accumulate, 0.0, JOINT, True),
        (
            JOINT,
            t.joint_epochs,
            joint_rates,
            accumulate,
            t.lr_step_epochs * epoch / accumulate,
            JOINT,
            True,
        ),
        (
            FINETUNE,
            t.finetune_epochs,
            {"last_layer": t.finetune_lr},
            accumulate,
            0.0,
            FINETUNE,
            t.reference_bn_update_in_finetune,
        ),
    ]
    if pruned and t.prune.enabled:
        specs.append(
            (
                PRUNE_FINETUNE,
                t.prune.finetune_epochs,
                {"last_layer": t.finetune_lr},
                1,
                0.0,
                FINETUNE,
                t.reference_bn_update_in_finetune,
            )
        )
    phases = []
    step = 0
    for name, epochs, rates, acc, decay, loss_phase, bn_train in specs:
        if epochs <= 0:
            continue
        phases.append(
            Phase(
                name=name,
                first_step=step,
                num_steps=epochs * epoch,
                learning_rates=dict(rates),
                accumulate_steps=acc,
                lr_decay_steps=decay,
                lr_gamma=t.lr_gamma if decay else 1.0,
                loss_phase=loss_phase,
                bn_train=bn_train,
            )
        )
        step += epochs * epoch
    return phases


def make_optimizer(phase: Phase) -> optax.GradientTransformation:
    """Adam per trained group (StepLR when the phase has one), zero updates elsewhere."""
    transforms = {}
    for group in PARAM_GROUPS:
        rate = phase.learning_rates.get(group)
        if rate is None:
            transforms[group] = optax.set_to_zero()
            continue
        if phase.lr_decay_steps:
            rate = optax.exponential_decay(
                rate,
                transition_steps=phase.lr_decay_steps,
                decay_rate=phase.lr_gamma,
                staircase=True,
            )
        transforms[group] = optax.adam(rate, b1=0.9, b2=0.999, eps=1e-8)
    tx = optax.multi_transform(transforms, param_group_labels)
    if phase.accumulate_steps > 1:
        # Averaging the gradients of k batches equals the reference's loss / k summed over
        # k backward passes before one step.
        tx = optax.MultiSteps(tx, every_k_schedule=phase.accumulate_steps)
    return tx


def phase_at(phases: list[Phase], step: int) -> Phase | None:
    """The phase containing global ``step`` (None once training is over)."""
    for phase in phases:
        if phase.first_step <= step < phase.end_step:
            return phase
    return None
