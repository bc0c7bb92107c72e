"""The embedded default: the synthetic "parts world" dataset, end to end on a laptop CPU.

Command: ``make demo`` (or, after ``make install``:
``python -m segmentation.export --config configs/demo.py``).

Hardware: 2 CPU cores. Expected (measured from a fresh clone on two 2-core build hosts):
export ~4 s, training ~3 min, then `make demo` prints the test accuracy (0.9875 on one host,
0.9187 on another: the run is deterministic on one machine, but XLA:CPU's last bits depend on
the CPU model), an evaluation table with "explanations on the deciding part" (55.21 % /
47.50 %) against a chance level of 25.06 %, and the path of the HTML report
(workdirs/demo/report/index.html). Whole `make demo`: under 6 min.
"""

from configs import common


def get_config():
    c = common.get_base_config()
    c.seed = 0
    c.dataset.name = "parts_world"
    c.dataset.root = "data/parts_world"
    c.dataset.records_dir = "data/parts_world/records_gt"
    c.dataset.num_classes = 8
    c.dataset.synthetic.num_classes = 8
    c.dataset.synthetic.image_size = 96
    c.segmentation.method = "gt"
    c.segmentation.max_masks = 8
    c.segmentation.shards = dict(train=4, test=2)
    c.input.canvas_size = 96
    c.input.num_views = 6
    c.input.view_size = 64
    c.input.batch_size = 32
    c.input.eval_batch_size = 64
    c.model.backbone = "resnet_tiny"
    c.model.prototype_dim = 64
    c.model.prototypes_per_class = 3
    c.model.compute_dtype = "float32"
    c.train.joint_epochs = 40
    c.train.finetune_epochs = 3
    c.train.backbone_lr = 1e-3
    c.train.accumulate_steps = 1
    c.train.lr_step_epochs = 20
    c.train.eval_every_epochs = 10
    c.train.log_every_steps = 10
    return common.finalize(c)
