"""sdxl_core: Stable Diffusion XL (base + refiner) in plain PyTorch, usable without ComfyUI."""

__version__ = "0.1.0"
