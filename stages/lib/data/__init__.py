"""Images and data sets: inspection and decoding (the torch-free preprocessing contract), the manifest,
Great Expectations checks, splits, the prepared cache and augmentation. Imports only core."""
