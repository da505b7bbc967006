"""The trainer shared by every esh model (and any timm model)."""
