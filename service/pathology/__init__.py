"""Pathology on top of the core: Grad-CAM, class maps of large images, slides, tiles, overlays."""
