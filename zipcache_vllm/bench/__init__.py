"""Benchmarks (``zipcache-vllm bench ...``): kernels against vLLM's own CPU attention."""
