"""CUB-200-2011 with SAM masks: the reference's ``cub200_sam2`` hyper-parameters.

Commands (from the repository root; CUB_200_2011.tgz unpacked to data/CUB_200_2011 and,
for the bird masks, segmentations.tgz beside or inside it; the SAM and ResNet-50
checkpoints downloaded by hand: docs/datasets.md gives the URLs, layout and hash checks):

    python -m segmentation.export --config configs/cub.py \
        --config.segmentation.sam.checkpoint=/path/to/sam_vit_h_4b8939.pth
    python -m protomask_jax.train --config configs/cub.py --workdir workdirs/cub \
        --config.model.pretrained=/path/to/resnet50-19c8e357.pth

Hardware: one GPU with >= 40 GB (H100: see benchmarks/README.md for step throughput),
or a TPU VM slice; export with SAM ViT-H wants a GPU (about 1 image/s on one H100).
Expected: the paper's ResNet-50 ProtoMask accuracy on CUB-200 (arXiv 2510.00683); a full
110-epoch run has not been reproduced with this code yet (no dataset on our build machines).
"""

from configs import common


def get_config():
    return common.sam_dataset_config("cub200")
