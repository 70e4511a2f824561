"""ZipCache: normalized attention from probe queries picks the 4-bit tokens (the base behaviour)."""
from .base import KVPolicy, register


@register("zipcache")
class ZipCachePolicy(KVPolicy):
    """Salient = top ``salient_ratio`` of normalized attention per block; see :class:`KVPolicy`."""
