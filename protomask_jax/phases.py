"""Training phases: which parameter groups move, at which learning rates, for how long.

As the reference (docs/reference.md §5.2): warmup (prototypes; backbone frozen), joint
(backbone and prototypes, StepLR), fine-tune (last layer), each with its own Adam (betas
0.9/0.999, eps 1e-8, no weight decay) and accumulation over ``accumulate_steps`` batches;
pruning adds "prune_finetune" (no accumulation). Frozen groups get ``set_to_zero`` and, in
the step, ``stop_gradient``, so XLA never computes their gradients.
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
    """One phase of the schedule, in global steps (one step = one global batch)."""

    name: str  # warmup | joint | finetune | prune_finetune
    first_step: int
    num_steps: int
    learning_rates: dict[str, float]  # per trained group; the groups absent are frozen
    accumulate_steps: int  # batches per optimizer update
    lr_decay_steps: float = 0  # optimizer updates between StepLR decays; 0 for none
    lr_gamma: float = 1.0
    loss_phase: str = JOINT  # the loss variant: joint (also for warmup) or finetune
    bn_train: bool = True  # batch statistics, running averages move

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
    """The phases with at least one step, in order, for a training split of
    ``num_train_images``; ``pruned`` adds the post-pruning fine-tune when enabled."""
    t = config.train
    epoch = steps_per_epoch(num_train_images, config.input.batch_size)
    warm_rates = {"prototypes": t.warmup_lr}
    joint_rates = {"backbone": t.backbone_lr, "prototypes": t.prototype_lr}
    if not t.reference_frozen_addon:
        warm_rates["add_on"] = t.warmup_lr
        joint_rates["add_on"] = t.addon_lr
    finetune = dict(
        learning_rates={"last_layer": t.finetune_lr},
        loss_phase=FINETUNE,
        bn_train=t.reference_bn_update_in_finetune,
    )
    decay = t.lr_step_epochs * epoch / t.accumulate_steps
    specs = [
        (WARMUP, t.warmup_epochs, dict(learning_rates=warm_rates)),
        (JOINT, t.joint_epochs, dict(learning_rates=joint_rates, lr_decay_steps=decay)),
        (FINETUNE, t.finetune_epochs, finetune),
    ]
    if pruned and t.prune.enabled:
        specs.append((PRUNE_FINETUNE, t.prune.finetune_epochs, dict(finetune, accumulate_steps=1)))
    phases, step = [], 0
    for name, epochs, options in specs:
        if epochs <= 0:
            continue
        options = {"accumulate_steps": t.accumulate_steps, **options}
        if options.get("lr_decay_steps"):
            options["lr_gamma"] = t.lr_gamma
        phases.append(Phase(name=name, first_step=step, num_steps=epochs * epoch, **options))
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
                rate, phase.lr_decay_steps, phase.lr_gamma, staircase=True
            )
        transforms[group] = optax.adam(rate, b1=0.9, b2=0.999, eps=1e-8)
    tx = optax.multi_transform(transforms, param_group_labels)
    if phase.accumulate_steps > 1:
        # Averaging the gradients of k batches equals the reference's loss / k summed over
        # k backward passes before one step.
        tx = optax.MultiSteps(tx, every_k_schedule=phase.accumulate_steps)
    return tx
