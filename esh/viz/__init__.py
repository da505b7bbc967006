"""Pictures of what a model does: α-saliency heatmaps of ESH-Vision's routing."""

from .saliency import alpha_maps, demo, load_saliency_model, render_saliency, saliency_title, save_saliency

__all__ = ["alpha_maps", "demo", "load_saliency_model", "render_saliency", "saliency_title", "save_saliency"]
