"""The full configuration tree shared by every dataset config.

Every key the code reads is defined here, with the reference's value where the reference
has one (``shared/reference/protomask-reference.md`` §5.3). Dataset files (``cub.py``,
``dogs.py``, ``cars.py``, ``demo.py``) start from :func:`get_base_config`, change what
differs and return the config locked, so a misspelt key on the command line
(``--config.input.num_view=8``) fails and lists the valid keys instead of being ignored.

Flags named ``reference_*`` reproduce a behaviour of the reference PyTorch code that we
consider a bug (reference doc §9); they are all off by default.
"""

from __future__ import annotations

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
    """Returns the unlocked base config (ImageNet-scale defaults, ResNet-50, CUB-like)."""
    c = ml_collections.ConfigDict()
    c.seed = 4861  # the reference's default seed

    # ------------------------------------------------------------------ dataset
    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "cub200"  # parts_world | cub200 | dogs | cars196 | folder | tfds
    c.dataset.root = ""  # local folder holding the raw dataset (official layout)
    c.dataset.tfds_name = ""  # for name == "tfds": e.g. caltech_birds2011
    c.dataset.tfds_data_dir = ""
    c.dataset.records_dir = ""  # where the export writes / training reads TFRecords
    c.dataset.num_classes = 200
    c.dataset.multi_label = False
    # Only read when name == "parts_world" (the embedded synthetic dataset).
    c.dataset.synthetic = ml_collections.ConfigDict()
    c.dataset.synthetic.num_classes = 8
    c.dataset.synthetic.image_size = 96
    c.dataset.synthetic.train_per_class = 80
    c.dataset.synthetic.test_per_class = 20
    c.dataset.synthetic.seed = 0

    # ------------------------------------------------------------- segmentation
    c.segmentation = ml_collections.ConfigDict()
    c.segmentation.method = "sam"  # sam | slic | grid | gt
    c.segmentation.max_masks = 16  # K_max stored per image (largest first)
    c.segmentation.skip_background = 0  # leading (largest) masks to drop; reference: 0
    c.segmentation.min_box_px = 2  # drop masks whose box is <= this many px wide or high
    c.segmentation.shards = ml_collections.ConfigDict(dict(train=16, test=8))
    c.segmentation.device = "auto"  # torch device for sam: auto | cpu | cuda
    c.segmentation.sam = ml_collections.ConfigDict()
    c.segmentation.sam.checkpoint = ""  # local path, e.g. sam_vit_h_4b8939.pth
    c.segmentation.sam.checkpoint_sha256 = ""  # verified when given
    c.segmentation.sam.model_type = "vit_h"
    c.segmentation.sam.points_per_side = 32
    c.segmentation.sam.points_per_batch = 64
    c.segmentation.sam.pred_iou_thresh = 0.86
    c.segmentation.sam.stability_score_thresh = 0.92
    c.segmentation.sam.crop_n_layers = 1
    c.segmentation.sam.crop_n_points_downscale_factor = 2
    c.segmentation.sam.min_mask_region_area = 0
    c.segmentation.slic = ml_collections.ConfigDict()
    c.segmentation.slic.n_segments = 16
    c.segmentation.slic.compactness = 10.0
    c.segmentation.slic.sigma = 1.0
    c.segmentation.grid = ml_collections.ConfigDict()
    c.segmentation.grid.rows = 2
    c.segmentation.grid.cols = 2

    # -------------------------------------------------------------------- input
    c.input = ml_collections.ConfigDict()
    c.input.canvas_size = 448  # decoded image is fitted (aspect kept) into S x S
    c.input.num_views = 11  # K: views per image (cyclic padding when fewer masks)
    c.input.view_size = 224
    c.input.batch_size = 16  # global batch, images
    c.input.eval_batch_size = 64
    c.input.num_workers = 0  # grain worker processes; 0 = in the main process
    c.input.prefetch = 2  # batches prefetched to device
    c.input.fill_background = "original"  # original (crop the image) | mask (zero outside)
    c.input.mask_size = 112  # resolution of masks shipped to device when fill == mask
    c.input.validation_fraction = 0.1  # carved out of train (reference selects on test)
    c.input.skip_bad_records = False
    c.input.augment = ml_collections.ConfigDict()  # reference "medium" ranges
    c.input.augment.flip = True
    c.input.augment.rotate_deg = 15.0
    c.input.augment.shear_deg = 15.0
    c.input.augment.perspective = 0.05
    c.input.augment.brightness = 0.15
    c.input.augment.contrast = 0.15
    c.input.augment.saturation = 0.15
    c.input.augment.hue = 0.025

    # -------------------------------------------------------------------- model
    c.model = ml_collections.ConfigDict()
    c.model.backbone = "resnet50"  # resnet18/34/50/101/152 | resnet_tiny | resnet_micro
    c.model.pretrained = ""  # local torchvision/ProtoPNet ResNet state_dict (.pth)
    c.model.pretrained_sha256 = ""
    c.model.import_protomask = ""  # local quanproto ProtoMask state_dict to start from
    c.model.prototype_dim = 1280
    c.model.prototypes_per_class = 10
    c.model.incorrect_strength = 0.0  # last-layer init for wrong-class connections
    c.model.similarity_eps = 1e-4  # log((d+1)/(d+eps)); reference 1e-14, see model code
    c.model.compute_dtype = "bfloat16"  # activations; parameters stay float32

    # --------------------------------------------------------------------- loss
    c.loss = ml_collections.ConfigDict()
    c.loss.ce = 1.0
    c.loss.cluster = 0.8
    c.loss.separation = 0.2
    c.loss.diversity = 0.2
    c.loss.l1 = 1e-3
    c.loss.class_weighted = True  # w_c = N / (C n_c) from the training split
    c.loss.reference_detached_diversity = False  # §9.3: reference detaches it (no grad)

    # -------------------------------------------------------------------- train
    c.train = ml_collections.ConfigDict()
    c.train.warmup_epochs = 0
    c.train.joint_epochs = 100
    c.train.finetune_epochs = 10
    c.train.warmup_lr = 1e-3
    c.train.backbone_lr = 6e-5
    c.train.addon_lr = 3e-3
    c.train.prototype_lr = 3e-3
    c.train.finetune_lr = 3e-4
    c.train.lr_step_epochs = 35  # joint-phase StepLR
    c.train.lr_gamma = 0.5
    c.train.accumulate_steps = 4
    c.train.reference_frozen_addon = False  # §9.2: reference never optimises the add-on
    c.train.push = True  # project prototypes onto training views before fine-tune
    c.train.reference_push_per_batch = False  # §9.1: running min reset every batch
    c.train.reference_bn_update_in_finetune = False  # §9.14: BN stats move in fine-tune
    c.train.prune = ml_collections.ConfigDict()
    c.train.prune.enabled = False
    c.train.prune.k = 6
    c.train.prune.threshold = 3
    c.train.prune.finetune_epochs = 5
    c.train.eval_every_epochs = 10
    c.train.log_every_steps = 50
    c.train.checkpoint_every_steps = 500
    c.train.keep_checkpoints = 3

    # --------------------------------------------------------------------- mesh
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by the other axes
    c.mesh.model = 1  # shards prototypes and last layer when > 1

    return c


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Locks ``config`` so unknown keys are errors, and returns it."""
    config.lock()
    return config
