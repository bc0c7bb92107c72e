"""Stanford Dogs with SAM masks: the reference's ``dogs_sam2`` hyper-parameters.

Commands: as in ``configs/cub.py`` with ``--config configs/dogs.py`` and
``--workdir workdirs/dogs``; the official Images/, Annotation/ and lists/ unpacked under
data/stanford_dogs (archives and layout: docs/datasets.md).

Hardware: one GPU with >= 40 GB or a TPU VM slice (K=13 views per image).
Expected: not yet reproduced here (no dataset on our build machines); the paper reports
ResNet-50 ProtoMask accuracy on Stanford Dogs in its table of results.
"""

from configs import common


def get_config():
    return common.sam_dataset_config("dogs")
