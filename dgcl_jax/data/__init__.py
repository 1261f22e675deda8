"""Input pipelines: sources (Pascal, Cityscapes, custom, TFDS, synthetic), transforms, grain loaders."""

from dgcl_jax.data.pipeline import (  # noqa: F401
    DataError, check_inputs, check_val_inputs, class_names, create_train_iterator, create_val_iterator, load_image,
    normalize, num_unlabeled, num_val_images, palette, steps_per_epoch)
