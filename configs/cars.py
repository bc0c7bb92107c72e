"""Stanford Cars (cars196) with SAM masks: the reference's ``cars196_sam2`` hyper-parameters.

Commands (official cars_train/, cars_test/, devkit/ and cars_test_annos_withlabels.mat under
data/stanford_cars; archives, layout and checkpoints: docs/datasets.md):

    python -m segmentation.export --config configs/cars.py \
        --config.segmentation.sam.checkpoint=/path/to/sam_vit_h_4b8939.pth
    python -m protomask_jax.train --config configs/cars.py --workdir workdirs/cars \
        --config.model.pretrained=/path/to/resnet50-19c8e357.pth

Hardware: one GPU with >= 40 GB or a TPU VM slice (K=16 views per image).
Expected: not yet reproduced here (no dataset on our build machines); the paper reports
ResNet-50 ProtoMask accuracy on Stanford Cars in its Table of results.
"""

from configs import common


def get_config():
    c = common.get_base_config()
    c.dataset.name = "cars196"
    c.dataset.root = "data/stanford_cars"
    c.dataset.records_dir = "data/records/cars196_sam"
    c.dataset.num_classes = 196
    c.segmentation.method = "sam"
    c.input.num_views = 16
    c.train.backbone_lr = 6e-5
    c.train.prototype_lr = 2e-3
    c.train.lr_step_epochs = 35
    return common.finalize(c)
