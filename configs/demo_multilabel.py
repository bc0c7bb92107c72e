"""The multi-label demo: the parts world asking which attributes an image shows.

Command (after ``make install``), as ``make demo`` with ``CONFIG=configs/demo_multilabel.py
WORKDIR=workdirs/demo_multilabel``: export, train, evaluate, explain.

Each image shows 1-4 of 8 attributes (a part in a signature shape and colour; 2 on average);
the label is the attribute set. Training uses the multi-label margin loss; the decision
threshold on the logits is the reference's (mean true-positive + mean true-negative logit) / 2
on the validation images, stored with the run. Same model and schedule as configs/demo.py
(2 CPU cores: a few minutes).
"""

from configs import demo


def get_config():
    c = demo.get_config()
    c.unlock()
    c.dataset.update(
        root="data/parts_world_multilabel",
        records_dir="data/parts_world_multilabel/records_gt",
        multi_label=True,
    )
    c.dataset.synthetic.multi_label = True
    c.lock()
    return c
