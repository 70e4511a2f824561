"""Paged FastGen's measurements (docs/FASTGEN.md): ``zipcache-vllm fastgen``.

* :mod:`.cli` - ``layout``, ``profile-cost`` and ``engine-check`` modes.
* :mod:`.engine_check` - engine logprobs vs the offline simulator, capacity from the log.
* :mod:`.profile_cost` - profiling's time as a share of prefill.

The method itself is a policy: ``policies/fastgen.py`` (:class:`FastGenPolicy`, its hooks
in the engine's step and its engine state), ``policies/fastgen_pages.py`` (ladder, slot
selection, pages), ``policies/token_classes.py``; its simulator mirror is
``eval/fastgen_sim.py``.
"""
