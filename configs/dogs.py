"""Stanford Dogs with SAM masks: the reference's ``dogs_sam2`` hyper-parameters.

Commands (official Images/, Annotation/ and lists/ unpacked under data/stanford_dogs;
archives, layout and checkpoints: docs/datasets.md):

    python -m segmentation.export --config configs/dogs.py \
        --config.segmentation.sam.checkpoint=/path/to/sam_vit_h_4b8939.pth
    python -m protomask_jax.train --config configs/dogs.py --workdir workdirs/dogs \
        --config.model.pretrained=/path/to/resnet50-19c8e357.pth

Hardware: one GPU with >= 40 GB or a TPU VM slice (K=13 views per image).
Expected: not yet reproduced here (no dataset on our build machines); the paper reports
ResNet-50 ProtoMask accuracy on Stanford Dogs in its Table of results.
"""

from configs import common


def get_config():
    c = common.get_base_config()
    c.dataset.name = "dogs"
    c.dataset.root = "data/stanford_dogs"
    c.dataset.records_dir = "data/records/dogs_sam"
    c.dataset.num_classes = 120
    c.segmentation.method = "sam"
    c.input.num_views = 13
    c.train.backbone_lr = 1e-5
    c.train.prototype_lr = 3e-3
    c.train.lr_step_epochs = 30
    return common.finalize(c)
