"""The feature store: HDF5 cache files, what they hold, the rows read from them, and the extraction that fills them."""
