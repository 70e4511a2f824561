"""The hardware catalog: ``configs/hardware/catalog.yaml`` (GPUs and CPU machines), validated.

The catalog is not in ``configs/*.yaml`` on purpose: those files are KV presets
(``zipcache_vllm.config.list_presets``).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import CONFIG_DIR

CATALOG_PATH = CONFIG_DIR / "hardware" / "catalog.yaml"


class GPU(BaseModel):
    """One GPU model."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    memory_gib: float = Field(gt=0, description="device total as CUDA reports it, GiB")
    bandwidth_gbs: float = Field(gt=0, description="memory bandwidth, GB/s (datasheet)")


class CPU(BaseModel):
    """One CPU machine for vLLM's CPU backend."""

    model_config = ConfigDict(extra="forbid")

    description: str = ""
    memory_gib: float = Field(gt=0, description="RAM, GiB")
    kv_cache_space_gib: int = Field(gt=0, description="default VLLM_CPU_KVCACHE_SPACE (integer GiB)")
    bandwidth_gbs: Optional[float] = Field(None, gt=0, description="memory bandwidth, GB/s")


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gpus: dict[str, GPU]
    cpus: dict[str, CPU]

    def names(self) -> list[str]:
        return sorted(self.gpus) + sorted(self.cpus)

    def lookup(self, name: str) -> GPU | CPU:
        """The GPU or CPU named ``name``; unknown names list the valid ones."""
        if name in self.gpus:
            return self.gpus[name]
        if name in self.cpus:
            return self.cpus[name]
        raise ValueError(f"unknown hardware {name!r}; catalog ({CATALOG_PATH}): {', '.join(self.names())}")


@lru_cache(maxsize=None)
def load_catalog(path: Path | None = None) -> Catalog:
    path = Path(path or CATALOG_PATH)
    try:
        return Catalog.model_validate(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ValueError(f"hardware catalog {path}: {exc}") from None
