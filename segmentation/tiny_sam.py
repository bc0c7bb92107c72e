"""Randomly initialised, tiny SAM and SAM 2 models for tests and CPU benchmarks (not real
segmenters).

Built from segment_anything's own modules (image size 256, ViT depth 2, width 64), the SAM
runs the real automatic mask generator in ~0.1-0.3 s per small image on a CPU core; the SAM 2
(sam2's modules from a hydra-style config: image size 256, a 5-block Hiera of width 8, a
32-wide neck and heads) in ~0.2-0.5 s. Their masks are noise: use relaxed thresholds
(``pred_iou_thresh`` very low, ``stability_score_thresh`` 0).
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


def _node(target: str, **kwargs) -> dict[str, Any]:
    return {"_target_": f"sam2.modeling.{target}", **kwargs}


def tiny_sam2_config(image_size: int = 256) -> dict[str, Any]:
    """The tiny SAM 2 as a sam2 model config (``OmegaConf.create`` / ``.save`` it); the
    memory modules are required by ``SAM2Base`` but unused on still images."""
    sine = "position_encoding.PositionEmbeddingSine"
    rope = dict(rope_theta=10000.0, feat_sizes=[image_size // 16] * 2, embedding_dim=32)
    rope.update(num_heads=1, downsample_rate=1, dropout=0.0)
    trunk = _node("backbones.hieradet.Hiera", embed_dim=8, num_heads=1, stages=[1, 1, 2, 1])
    trunk.update(global_att_blocks=[3], window_spec=[4, 4, 4, 4])
    trunk.update(window_pos_embed_bkg_spatial_size=[4, 4])
    neck = _node("backbones.image_encoder.FpnNeck", d_model=32, fpn_interp_model="nearest")
    neck.update(backbone_channel_list=[64, 32, 16, 8], fpn_top_down_levels=[2, 3])
    neck["position_encoding"] = _node(sine, num_pos_feats=32, normalize=True, temperature=10000)
    layer = _node("memory_attention.MemoryAttentionLayer", activation="relu", d_model=32)
    layer.update(dim_feedforward=32, dropout=0.0, pos_enc_at_attn=False)
    layer.update(pos_enc_at_cross_attn_keys=True, pos_enc_at_cross_attn_queries=False)
    layer["self_attention"] = _node("sam.transformer.RoPEAttention", **rope)
    layer["cross_attention"] = _node(
        "sam.transformer.RoPEAttention", rope_k_repeat=True, kv_in_dim=16, **rope
    )
    fuser_block = _node("memory_encoder.CXBlock", dim=32, kernel_size=7, padding=3)
    fuser_block.update(layer_scale_init_value=1e-6, use_dwconv=True)
    memory_encoder = _node("memory_encoder.MemoryEncoder", out_dim=16)
    memory_encoder.update(
        position_encoding=_node(sine, num_pos_feats=16, normalize=True, temperature=10000),
        mask_downsampler=_node("memory_encoder.MaskDownSampler", kernel_size=3, stride=2),
        fuser=_node("memory_encoder.Fuser", num_layers=1, layer=fuser_block),
    )
    model = _node("sam2_base.SAM2Base", image_size=image_size, num_maskmem=7)
    model.update(
        image_encoder=_node(
            "backbones.image_encoder.ImageEncoder", scalp=1, trunk=trunk, neck=neck
        ),
        memory_attention=_node(
            "memory_attention.MemoryAttention",
            d_model=32,
            pos_enc_at_input=True,
            num_layers=1,
            layer=layer,
        ),
        memory_encoder=memory_encoder,
    )
    # The switches of sam2's own configs that shape the image path.
    switches = """use_high_res_features_in_sam multimask_output_in_sam iou_prediction_use_sigmoid
        pred_obj_scores pred_obj_scores_mlp directly_add_no_mem_embed fixed_no_obj_ptr
        use_obj_ptrs_in_encoder use_mlp_for_obj_ptr_proj multimask_output_for_tracking
        use_multimask_token_for_obj_ptr"""
    model.update(dict.fromkeys(switches.split(), True))
    return {"model": model}


def tiny_sam2(seed: int = 0) -> Any:
    """Returns the tiny SAM 2 in eval mode (imports torch, hydra and sam2)."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    return instantiate(OmegaConf.create(tiny_sam2_config()).model, _recursive_=True).eval()
