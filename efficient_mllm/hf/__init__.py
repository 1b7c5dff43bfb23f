"""Hugging Face checkpoints: safetensors <-> NNX models, by model family.

``load_pretrained(hf_dir)`` streams a local checkpoint into our model (sharded on a mesh if
given); ``save_pretrained(model, config, out_dir, family=...)`` writes it back. Families
(``efficient_mllm.hf.families``) map each HF ``model_type`` to our config, module and tensor
layout; ``supported_model_types()`` lists them.
"""

from efficient_mllm.hf.convert import Pretrained, load_pretrained, save_pretrained
from efficient_mllm.hf.families import (
    Family,
    TensorMap,
    get_family,
    register_family,
    supported_model_types,
)

__all__ = [
    "Family",
    "Pretrained",
    "TensorMap",
    "get_family",
    "load_pretrained",
    "register_family",
    "save_pretrained",
    "supported_model_types",
]
