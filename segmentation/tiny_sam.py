"""A randomly initialised, tiny SAM for tests and CPU benchmarks (not a real segmenter).

Built from segment_anything's own modules (image size 256, ViT depth 2, width 64), it runs
the real automatic mask generator in ~0.1-0.3 s per small image on a CPU core. Its masks are
noise: use relaxed thresholds (``pred_iou_thresh`` very low, ``stability_score_thresh`` 0).
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
