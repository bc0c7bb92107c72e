"""The embedded default: the synthetic "parts world" dataset, end to end on a laptop CPU.

Command: ``make demo`` (or, after ``make install``:
``python -m segmentation.export --config configs/demo.py``).

Hardware: 2 CPU cores. Expected (measured on the 2-core build hosts): export ~4 s, training
3-6 min, then the test accuracy (0.9938 for seed 0 on 2026-11-29; XLA:CPU's last bits depend
on the CPU model, so other hosts train other runs), an evaluation table with "explanations
on the deciding part" against a chance level of 25.06 %, and the path of the HTML report
(workdirs/demo/report/index.html). Whole `make demo`: under 8 min.
"""

from configs import common


def get_config():
    c = common.get_base_config()
    c.seed = 0
    c.dataset.update(
        name="parts_world",
        root="data/parts_world",
        records_dir="data/parts_world/records_gt",
        num_classes=8,
    )
    c.dataset.synthetic.update(num_classes=8, image_size=96)
    c.segmentation.update(method="gt", max_masks=8, shards=dict(train=4, test=2))
    c.input.update(canvas_size=96, num_views=6, view_size=64, batch_size=32, eval_batch_size=64)
    # Three stages, widths 16-32-64: the last map stays 4x4 at 64 px views (XLA:CPU is slow
    # on 2x2 maps).
    c.model.update(
        backbone="resnet_tiny", prototype_dim=64, prototypes_per_class=3, compute_dtype="float32"
    )
    c.train.update(joint_epochs=40, finetune_epochs=3, backbone_lr=1e-3, accumulate_steps=1)
    c.train.update(lr_step_epochs=20, eval_every_epochs=10, log_every_steps=10)
    return common.finalize(c)
