"""Materializes the embedded GGUF test model into a plain Hugging Face folder.

Import-light on purpose: ``prepare`` imports torch/transformers only inside functions.
"""

from zipcache_vllm.model.prepare import (  # noqa: F401
    ModelNotInstalledError,
    default_model_dir,
    prepare_default_model,
    prepare_model,
)
