"""Files to batches of tensors: discovery, decoding, resizing, VGG mean-centring, augmentation."""
