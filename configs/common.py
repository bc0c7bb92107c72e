"""The full configuration tree shared by every dataset config.

Every key the code reads is defined here, with the reference's value where it has one
(``docs/reference.md`` §5.3). Dataset files start from :func:`get_base_config` (or
:func:`sam_dataset_config`), change what differs and return the config locked, so a
misspelt key on the command line (``--config.input.num_view=8``) is refused with the valid
keys instead of being ignored. Flags named ``reference_*`` reproduce a behaviour of the
reference that we consider a bug (``docs/reference.md`` §9); all are off by default.
"""

from __future__ import annotations

from ml_collections import ConfigDict

# Keys are grouped by meaning, several to a line.
# fmt: off


def _dataset() -> ConfigDict:
    return ConfigDict(dict(
        name="cub200",  # parts_world | cub200 | dogs | cars196 | folder | tfds
        root="",  # local folder holding the raw dataset (official layout)
        tfds_name="", tfds_data_dir="",  # for name == "tfds": e.g. caltech_birds2011
        records_dir="",  # where the export writes and training reads TFRecords
        num_classes=200, multi_label=False,
        # Read only when name == "parts_world" (the embedded synthetic dataset).
        synthetic=dict(num_classes=8, image_size=96, train_per_class=80, test_per_class=20,
                       seed=0, multi_label=False),  # multi_label: images show attribute sets
    ))


def _segmentation() -> ConfigDict:
    return ConfigDict(dict(
        method="sam",  # sam | sam2 | slic | grid | gt
        max_masks=16,  # K_max stored per image (largest first)
        skip_background=0,  # leading (largest) masks to drop; the reference: 0
        min_box_px=2,  # drop masks whose box is <= this many px wide or high
        shards=dict(train=16, test=8),
        device="auto",  # torch device for sam and sam2: auto | cpu | cuda
        sam=dict(
            checkpoint="",  # a local file, e.g. sam_vit_h_4b8939.pth
            checkpoint_sha256="",  # verified when given
            model_type="vit_h",
            # The rest are SamAutomaticMaskGenerator's arguments.
            points_per_side=32, points_per_batch=64, pred_iou_thresh=0.86,
            stability_score_thresh=0.92, crop_n_layers=1, crop_n_points_downscale_factor=2,
            min_mask_region_area=0,
        ),
        sam2=dict(
            checkpoint="", checkpoint_sha256="",  # a local file, e.g. sam2.1_hiera_base_plus.pt
            model_config="",  # a sam2 model .yaml; "": the package's sam2.1_hiera_b+.yaml
            # The rest are SAM2AutomaticMaskGenerator's arguments, the reference's values.
            points_per_side=32, points_per_batch=512, pred_iou_thresh=0.8,
            stability_score_thresh=0.9, stability_score_offset=0.5, crop_n_layers=2,
            mask_threshold=0.0, box_nms_thresh=0.7, crop_nms_thresh=0.7,
            crop_overlap_ratio=512 / 1500, crop_n_points_downscale_factor=1,
            min_mask_region_area=10, use_m2m=False,
        ),
        slic=dict(n_segments=16, compactness=10.0, sigma=1.0),
        grid=dict(rows=2, cols=2),
    ))


def _input() -> ConfigDict:
    return ConfigDict(dict(
        canvas_size=448,  # S: the decoded image is fitted (aspect kept) into S x S
        num_views=11,  # K (cyclic padding when an image has fewer masks)
        view_size=224,
        batch_size=16, eval_batch_size=64,  # global batches, images
        num_workers=0,  # grain worker processes; 0: the main process
        prefetch=2,  # batches prefetched to device
        fill_background="original",  # original (crop the image) | mask (zero outside)
        mask_size=112,  # resolution of the masks shipped to device for fill == mask
        validation_fraction=0.1,  # carved out of train (the reference selects on test)
        skip_bad_records=False,
        # The reference's "medium" ranges.
        augment=dict(flip=True, rotate_deg=15.0, shear_deg=15.0, perspective=0.05,
                     brightness=0.15, contrast=0.15, saturation=0.15, hue=0.025),
    ))


def _model() -> ConfigDict:
    return ConfigDict(dict(
        backbone="resnet50",  # resnet18/34/50/101/152 | resnet_tiny | resnet_micro
        pretrained="", pretrained_sha256="",  # torchvision/ProtoPNet ResNet state_dict
        import_protomask="",  # a quanproto ProtoMask state_dict to start from
        prototype_dim=1280, prototypes_per_class=10,
        incorrect_strength=0.0,  # last-layer init of wrong-class connections
        similarity_eps=1e-4,  # log((d+1)/(d+eps)); the reference's 1e-14, see §3
        compute_dtype="bfloat16",  # activations; parameters stay float32
        remat="none",  # none | blocks: recompute residual blocks in backward (less memory)
    ))


def _loss() -> ConfigDict:
    return ConfigDict(dict(
        ce=1.0, cluster=0.8, separation=0.2, diversity=0.2, l1=1e-3,
        class_weighted=True,  # w_c = N / (C n_c) from the training split
        reference_detached_diversity=False,  # §9.3: no gradient
    ))


def _train() -> ConfigDict:
    return ConfigDict(dict(
        warmup_epochs=0, joint_epochs=100, finetune_epochs=10,
        warmup_lr=1e-3, backbone_lr=6e-5, addon_lr=3e-3, prototype_lr=3e-3, finetune_lr=3e-4,
        lr_step_epochs=35, lr_gamma=0.5,  # joint-phase StepLR
        accumulate_steps=4,
        # Slices each batch is run in, one after another, to fit a larger batch in memory
        # (one more forward pass; BatchNorm sees each slice alone; docs/tpu.md).
        micro_batches=1,
        reference_frozen_addon=False,  # §9.2: the add-on is never optimised
        push=True,  # project prototypes onto training views before fine-tune
        reference_push_per_batch=False,  # §9.1: running min reset every batch
        reference_bn_update_in_finetune=False,  # §9.14: BN statistics move in fine-tune
        prune=dict(enabled=False, k=6, threshold=3, finetune_epochs=5),
        eval_every_epochs=10, log_every_steps=50,
        checkpoint_every_steps=500, keep_checkpoints=3,
    ))


def _explain() -> ConfigDict:
    return ConfigDict(dict(
        # What evaluate's map-based metrics and the report's panels explain with: prp (the
        # reference's PRP maps on the winning view, docs/prp.md) | mask (the view's mask).
        explanation_type="prp",
        prp_rule="reference",  # reference (the authors' broadcast, §6) | channelwise
        prp_batch_size=16,  # images per PRP call (its backward holds B*k views' activations)
        top_images=5,  # --techniques topk: images per prototype and split (§7.9)
    ))


# fmt: on


def get_base_config() -> ConfigDict:
    """The unlocked base config: CUB-like, ResNet-50, the reference's values."""
    c = ConfigDict()
    c.seed = 4861  # the reference's default seed
    c.dataset = _dataset()
    c.segmentation = _segmentation()
    c.input = _input()
    c.model = _model()
    c.loss = _loss()
    c.train = _train()
    c.explain = _explain()
    # data: -1 takes every device the other axes leave; model > 1 shards the prototypes
    # and the last layer; fsdp splits parameters and optimizer state over data (memory),
    # those of at least fsdp_min_size elements.
    c.mesh = ConfigDict(dict(data=-1, model=1, fsdp=False, fsdp_min_size=2**14))
    return c


# The reference's per-dataset values with SAM masks (docs/reference.md §5.3).
SAM_DATASETS = {
    # name: (root, classes, K views, backbone lr, prototype lr, StepLR period in epochs)
    "cub200": ("data/CUB_200_2011", 200, 11, 6e-5, 3e-3, 35),
    "dogs": ("data/stanford_dogs", 120, 13, 1e-5, 3e-3, 30),
    "cars196": ("data/stanford_cars", 196, 16, 6e-5, 2e-3, 35),
}


def sam_dataset_config(name: str) -> ConfigDict:
    """The locked config of a dataset of :data:`SAM_DATASETS`."""
    root, num_classes, num_views, backbone_lr, prototype_lr, step = SAM_DATASETS[name]
    c = get_base_config()
    c.dataset.update(
        name=name, root=root, records_dir=f"data/records/{name}_sam", num_classes=num_classes
    )
    c.segmentation.method = "sam"
    c.input.num_views = num_views
    # ~250 images/s per worker at CUB sizes (benchmarks/README.md): 4 feed one H100 at K = 11.
    c.input.num_workers = 4
    c.train.update(backbone_lr=backbone_lr, prototype_lr=prototype_lr, lr_step_epochs=step)
    return finalize(c)


def get_config() -> ConfigDict:
    """The base config, locked: what ``--config.`` overrides are checked against when a tool
    (evaluate, explain, predict) starts from a run's stored config without ``--config``."""
    return finalize(get_base_config())


def finalize(config: ConfigDict) -> ConfigDict:
    """Locks ``config`` so unknown keys are errors, and returns it."""
    config.lock()
    return config
