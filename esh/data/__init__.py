"""Data sets and transforms: the embedded default set, ImageFolder, HF datasets."""
