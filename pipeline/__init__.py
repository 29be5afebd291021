"""Files to batches of tensors: discovery, decoding, resizing, VGG mean-centring, augmentation."""

import os

# The checkout the tool runs from (it installs none of its own modules): what a child
# process needs on its path. Computed here, one level below the root, so that moving a
# module elsewhere cannot change it (two copies in deeper folders had both gone wrong).
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
