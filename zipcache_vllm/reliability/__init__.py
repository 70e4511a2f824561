"""Reliability tooling: a ``vllm serve`` process handle and an HTTP load driver.

* :mod:`.server` - start / stop one ``vllm serve`` (through our launcher), read its
  log, metrics and the zipcache worker-extension state.
* :mod:`.load` - many concurrent clients with mixed requests, then checks.
* :mod:`.cli` - ``zipcache-vllm reliability load``.
"""
