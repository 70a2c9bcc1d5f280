"""Stable Diffusion bases and their identity (base), LoRA files (lora_files, torch-free) and their writing (lora),
and domain pretraining of a base (pretrain)."""
