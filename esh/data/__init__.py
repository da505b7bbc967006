"""Data sets (the embedded digits, ImageFolder, .npz, HF datasets), the one image loader
(``images``) and the LM corpora and tokenizers."""
