"""Files to batches of tensors: discovery, decoding, resizing, VGG mean-centring, augmentation."""

import os

# The package's own folder and the folder that holds it (a checkout, or site-packages
# when installed): what a child process needs on its path. Computed here, one level
# below the package, so that moving a module elsewhere cannot change it.
PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_PARENT = os.path.dirname(PACKAGE)
