"""Adapters that let other sampling libraries drive fastsample's networks: `k_diffusion`
(k-diffusion's denoiser interface). Each imports nothing of the library it serves."""
