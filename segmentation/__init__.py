"""The torch side: segmenters, dataset sources and the export of masks + boxes to TFRecords.

Importing this package imports neither torch nor jax; only the ``sam`` segmenter imports torch.
"""
