"""ooc-ray: LoRA-fine-tuned Stable Diffusion synthetic data for microscopy classifiers, on Ray."""
__version__ = "0.1.0"
