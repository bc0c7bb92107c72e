"""Stanford Cars (cars196) with SAM masks: the reference's ``cars196_sam2`` hyper-parameters.

Commands: as in ``configs/cub.py`` with ``--config configs/cars.py`` and
``--workdir workdirs/cars``; the official cars_train/, cars_test/, devkit/ and
cars_test_annos_withlabels.mat under data/stanford_cars (archives and layout:
docs/datasets.md).

Hardware: one GPU with >= 40 GB or a TPU VM slice (K=16 views per image).
Expected: not yet reproduced here (no dataset on our build machines); the paper reports
ResNet-50 ProtoMask accuracy on Stanford Cars in its table of results.
"""

from configs import common


def get_config():
    return common.sam_dataset_config("cars196")
