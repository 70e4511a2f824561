"""The step engine: one layer's step of the zipcache KV cache, pure PyTorch, no vLLM.

* ``staging.py``: the full-precision partial blocks and their accumulators
  (:class:`~.staging.StagingPool`, :class:`~.staging.StagedBlock`).
* ``plan.py``: per-step planning, once for all layers (:func:`~.plan.plan_step`,
  :class:`~.plan.RequestPlan`, :class:`~.plan.DecodeBatch`).
* ``step.py``: applying one layer's step (:func:`~.step.apply_step`: decode rows,
  chunks; :func:`~.step.run_request_step` for one request).
* ``attention.py``: the attention math (local window, causal and tiled attention,
  online softmax, log-sum-exp merges).
* ``saliency.py``: the probe-attention accumulators a block's tokens are ranked by (the
  ranking itself is the policy's: :meth:`zipcache_vllm.policies.KVPolicy.rank`).

Every policy (``zipcache_vllm.policies``) runs this one flow through its hooks, paged
FastGen included (its profiling, slot selection and per-request state are
:class:`~zipcache_vllm.policies.FastGenPolicy`'s).

``vllm_plugin/backend.py`` drives it from vLLM; the packed pages are read and written
by ``zipcache_vllm.kernels``. Importing this package imports nothing from vLLM.
"""
