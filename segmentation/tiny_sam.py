"""Randomly initialised, tiny SAM and SAM 2 models for tests and CPU benchmarks (not real
segmenters).

Built from segment_anything's own modules (image size 256, ViT depth 2, width 64), the SAM
runs the real automatic mask generator in ~0.1-0.3 s per small image on a CPU core; the SAM 2
(sam2's smallest config shrunk to image size 256 and width 8-32) in ~0.1-0.5 s. Their masks
are noise: use relaxed thresholds (``pred_iou_thresh`` very low, ``stability_score_thresh``
0).
"""

from __future__ import annotations

import functools
from typing import Any


def tiny_sam(seed: int = 0) -> Any:
    """Returns the tiny SAM in eval mode (imports torch and segment_anything)."""
    import torch
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    torch.manual_seed(seed)
    image_size, patch_size, width = 256, 16, 64
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=image_size,
            patch_size=patch_size,
            embed_dim=width,
            depth=2,
            num_heads=2,
            mlp_ratio=2,
            out_chans=width,
            qkv_bias=True,
            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=4,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=width,
            image_embedding_size=(image_size // patch_size,) * 2,
            input_image_size=(image_size, image_size),
            mask_in_chans=8,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer_dim=width,
            transformer=TwoWayTransformer(depth=1, embedding_dim=width, mlp_dim=128, num_heads=2),
            iou_head_depth=2,
            iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


# sam2's smallest model config, shrunk: image size 256, a 5-block Hiera of width 8, a
# 32-wide neck and heads; the memory modules, unused on still images, shrunk to match.
_TINY_SAM2 = """image_size=256 image_encoder.trunk.embed_dim=8
image_encoder.trunk.stages=[1,1,2,1] image_encoder.trunk.global_att_blocks=[3]
image_encoder.trunk.window_spec=[4,4,4,4]
image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]
image_encoder.neck.d_model=32 image_encoder.neck.backbone_channel_list=[64,32,16,8]
image_encoder.neck.position_encoding.num_pos_feats=32 memory_attention.d_model=32
memory_attention.num_layers=1 memory_attention.layer.d_model=32
memory_attention.layer.dim_feedforward=32 memory_attention.layer.self_attention.embedding_dim=32
memory_attention.layer.cross_attention.embedding_dim=32
memory_attention.layer.cross_attention.kv_in_dim=16
memory_attention.layer.self_attention.feat_sizes=[16,16]
memory_attention.layer.cross_attention.feat_sizes=[16,16] memory_encoder.out_dim=16
memory_encoder.position_encoding.num_pos_feats=16 memory_encoder.fuser.layer.dim=32
memory_encoder.fuser.num_layers=1"""


def tiny_sam2_config() -> Any:
    """The tiny SAM 2 as a sam2 model config (an OmegaConf ``DictConfig``; ``.save`` it)."""
    from pathlib import Path

    import sam2
    from omegaconf import OmegaConf

    base = OmegaConf.load(Path(sam2.__file__).parent / "configs/sam2.1/sam2.1_hiera_t.yaml")
    return OmegaConf.merge(base, OmegaConf.from_dotlist(["model." + o for o in _TINY_SAM2.split()]))


def tiny_sam2(seed: int = 0) -> Any:
    """Returns the tiny SAM 2 in eval mode (imports torch, hydra and sam2)."""
    import torch
    from hydra.utils import instantiate

    torch.manual_seed(seed)
    return instantiate(tiny_sam2_config().model, _recursive_=True).eval()
