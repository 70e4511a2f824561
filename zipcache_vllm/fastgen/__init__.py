"""Paged FastGen: per-head adaptive eviction into fixed-size pages (docs/FASTGEN.md).

* :mod:`.tokens` - special / punctuation token classes of a tokenizer (cached).
* :mod:`.paged` - profiling from probe attention, slot selection, page packing.
* :mod:`.sim` - the offline simulator's mirror of the engine flow.
* ``engine/fastgen.py`` - the engine step.
"""
