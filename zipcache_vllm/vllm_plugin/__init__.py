"""Everything that touches vLLM (see ``docs/BACKEND.md``).

* ``compat.py``: all vLLM-internal imports and patches (vLLM 0.32.x).
* ``plugin.py``: ``register()``, the ``vllm.general_plugins`` entry point.
* ``dtypes.py``: ``--kv-cache-dtype`` names and the presets they select.
* ``backend.py``: Backend / Metadata / MetadataBuilder / Impl.
* ``flow.py``: one request's step (attention, saliency, packing), pure PyTorch.
* ``staging.py``: the full-precision partial blocks and their accumulators.

Importing this package imports nothing from vLLM and patches nothing.
"""
