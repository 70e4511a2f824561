"""Everything that touches vLLM (see ``docs/BACKEND.md``).

* ``compat.py``: all vLLM-internal imports and patches (vLLM 0.32.x).
* ``plugin.py``: ``register()``, the ``vllm.general_plugins`` entry point.
* ``dtypes.py``: ``--kv-cache-dtype`` names and the presets they select.
* ``backend.py``: Backend / Metadata / MetadataBuilder / Impl; they drive the step
  engine (``zipcache_vllm.engine``: planning, attention, saliency, packing, staging),
  which imports no vLLM.
* ``endpoints.py``, ``metrics.py``, ``kv_stats.py``, ``worker_ext.py``: the
  ``/zipcache`` routes, the stat logger, and the worker-state they read.

Importing this package imports nothing from vLLM and patches nothing.
"""
