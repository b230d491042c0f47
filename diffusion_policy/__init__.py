"""Reward-based fine-tuning of diffusion policies with Adjoint Matching on Push-T."""

__version__ = "0.1.0"
