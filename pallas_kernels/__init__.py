"""Standalone Pallas kernels (import jax only, never efficient_mllm)."""
