"""CUB-200-2011 with SAM masks: the reference's ``cub200_sam2`` hyper-parameters.

    python -m segmentation.export --config configs/cub.py \\
        --config.segmentation.sam.checkpoint=/path/to/sam_vit_h_4b8939.pth
    python -m protomask_jax.train --config configs/cub.py --workdir workdirs/cub \\
        --config.model.pretrained=/path/to/resnet50-19c8e357.pth

with CUB_200_2011.tgz unpacked to data/CUB_200_2011 and segmentations.tgz beside it
(archives, checkpoints and hash checks: docs/datasets.md). Hardware: one GPU with >= 40 GB
(step throughput: benchmarks/README.md) or a TPU VM slice; SAM ViT-H exports about one
image/s on an H100. Expected: the paper's ResNet-50 accuracy (arXiv 2510.00683); a full
110-epoch run has not been reproduced here (no dataset on our build machines)."""

from configs import common


def get_config():
    return common.sam_dataset_config("cub200")
