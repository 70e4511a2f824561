"""zipcache_vllm: ZipCache KV-cache compression as a vLLM plugin.

Keep this module import-light: the ``zipcache-vllm`` CLI and vLLM's plugin loader
import it in every process, so nothing heavy (torch, vllm, transformers) here.
"""

__version__ = "0.1.0"
