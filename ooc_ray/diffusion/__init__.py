"""Stable Diffusion bases and LoRA files (torch and diffusers load inside the functions that need them)."""
