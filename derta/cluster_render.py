"""`derta cluster render`: KubeRay manifests for a derta preset, so nobody hand-edits YAML.

For one preset it writes five manifests into one directory (the checked-in `cluster/` is this output for
`llama3-8b-full-derta`; tests/test_cluster_configs.py keeps them in sync):

  rayjob-prepare.yaml        RayJob  derta-prepare-<preset>  jobs/prepare.py on a CPU-only cluster (data check)
  rayjob-train.yaml          RayJob  derta-train-<preset>    jobs/train.py on GPU pods sized from train.*
  rayjob-eval.yaml           RayJob  derta-eval-<preset>     jobs/eval.py on the tuned model
  rayservice.yaml            RayService derta-serve          serve/serve_config.yaml for the tuned model
  raycluster-autoscaler.yaml RayCluster derta-cluster        long-lived autoscaling cluster for `ray job submit`

Code reaches the pods in one of two ways:
- image (default): the image built from ./Dockerfile has Ray, CUDA torch and derta installed (`pip install -e`
  in /home/ray/derta); entrypoints are `python -m jobs.<name>` and presets are referenced by name, so nothing
  depends on the driver's working directory and no pod pip-installs anything at start.
- `code_url` (development): a zip of the checkout (e.g. a GitHub archive of a commit) becomes the runtime env's
  `working_dir` and is pip-installed from the same URL. The runtime env never contains `$`: KubeRay passes it to
  `ray job submit` inside double quotes through bash, which would expand `${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}`
  to an empty string.

The Ray version comes from the one exact pin in pyproject.toml (`ray[...]==X.Y.Z`); `rayVersion` and every
`rayproject/ray` tag derive from it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from derta.config import REPO_ROOT, DertaConfig, load_config, resolve_preset

PYPROJECT = REPO_ROOT / "pyproject.toml"
SERVE_CONFIG = REPO_ROOT / "serve" / "serve_config.yaml"
PYTHON_TAG = "py311"  # the Python of the rayproject/ray base image (Dockerfile ARG PYTHON_TAG)
GPU = "nvidia.com/gpu"
# KubeRay appends a 5-character suffix to a RayJob's cluster name and `-head-svc` etc. to services; keep room.
MAX_NAME = 47
MANIFEST_FILES = ("rayjob-prepare.yaml", "rayjob-train.yaml", "rayjob-eval.yaml", "rayservice.yaml",
                  "raycluster-autoscaler.yaml")
_PIN = re.compile(r"""["']ray\[[^\]]*\]\s*==\s*(\d+\.\d+\.\d+)["']""")


class RenderError(ValueError):
    """The preset or the options cannot be turned into manifests; the message says what to change."""


def ray_version() -> str:
    """X.Y.Z of the exact `ray[...]==X.Y.Z` pin (pyproject.toml in a checkout, else the installed metadata)."""
    text = PYPROJECT.read_text() if PYPROJECT.is_file() else "\n".join(
        f'"{r}"' for r in (metadata.requires("derta") or []))
    pins = set(_PIN.findall(text))
    if len(pins) != 1:
        raise RenderError(f"{PYPROJECT}: expected one exact pin `ray[...]==X.Y.Z` in dependencies, found {pins or 'none'}")
    return pins.pop()


def derta_version() -> str:
    if PYPROJECT.is_file():
        match = re.search(r'^version\s*=\s*"([^"]+)"', PYPROJECT.read_text(), re.M)
        if match:
            return match.group(1)
    return metadata.version("derta")


def default_image() -> str:
    """The tag `docker build -t ... .` gives the Dockerfile's image in docs/cluster.md."""
    return f"derta:{derta_version()}-ray{ray_version()}"


def ray_base_image(flavor: str = "gpu") -> str:
    return f"rayproject/ray:{ray_version()}-{PYTHON_TAG}-{flavor}"


@dataclass
class RenderOptions:
    preset: str
    image: str | None = None           # default: default_image()
    storage: str = "derta-shared"      # ReadWriteMany PVC mounted at `mount` on every pod
    mount: str = "/mnt/shared"
    model: str | None = None           # served / evaluated model; default <train output>/final
    gpus_per_pod: int = 8              # GPU worker pod size (one node of 8 GPUs; lower for smaller nodes)
    cpus_per_gpu: int = 11             # 88 CPUs for an 8-GPU pod: fits 96-vCPU nodes after system reservations
    memory_per_gpu_gi: int = 64        # 512Gi for an 8-GPU pod: fits p4d/p5, a2/a3-highgpu-8g, ND96 after reservations
    code_url: str | None = None        # development: runtime-env working_dir + pip install from this zip URL
    hf_secret: str = "hf-token"        # optional Secret with key `token` (gated Llama-3 weights)
    direct_ingress: bool = True        # the preset's serve.direct_ingress (set by render)


# ------------------------------------------------------------------------------------------- pieces
IMAGE_HAPROXY_503 = "/home/ray/derta/serve/haproxy_503.sh"  # serve/haproxy_503.sh in the image (./Dockerfile)


def _name(kind: str, preset: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", f"derta-{kind}-{preset}".lower()).strip("-")
    if len(name) > MAX_NAME:
        raise RenderError(f"resource name {name!r} is longer than {MAX_NAME} characters; use a shorter preset name")
    return name


def _container(name: str, opts: RenderOptions, cpu: str, memory: str, gpus: int = 0, ports=None) -> dict:
    res: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        res[GPU] = str(gpus)
    env = [{"name": "HF_HOME", "value": f"{opts.mount}/hf"},
           {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": opts.hf_secret, "key": "token",
                                                                "optional": True}}}]
    if gpus:
        env.append({"name": "NCCL_DEBUG", "value": "WARN"})
    # serve.direct_ingress (the default): HAProxy on Serve's HTTP port (8000) forwards to the ingress replicas' own
    # ports instead of Serve's Python proxy; Ray reads these when `ray start` runs, so every node has them
    if opts.direct_ingress:
        env += [{"name": name, "value": "1"} for name in ("RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_ENABLE_HA_PROXY")]
        # HAProxy's own errors (no ingress replica ready yet, one gone) as 503 + Retry-After, not Ray's 500
        env.append({"name": "RAY_SERVE_HAPROXY_BINARY_PATH", "value": IMAGE_HAPROXY_503})
    c: dict[str, Any] = {"name": name, "image": opts.image, "imagePullPolicy": "IfNotPresent", "env": env,
                         "resources": {"requests": dict(res), "limits": dict(res)},
                         "volumeMounts": [{"name": "shared", "mountPath": opts.mount},
                                          {"name": "dshm", "mountPath": "/dev/shm"}]}
    if ports:
        c["ports"] = ports
    return c


def _pod(container: dict, claim: str, shm_gi: int, gpu: bool) -> dict:
    # NCCL and the object store use /dev/shm; the container default (64 MiB) is far too small. Memory-backed, so
    # it counts against the pod's memory limit: a quarter of it.
    spec: dict[str, Any] = {"containers": [container],
                            "volumes": [{"name": "shared", "persistentVolumeClaim": {"claimName": claim}},
                                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gi}Gi"}}]}
    if gpu:
        spec["tolerations"] = [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": spec}


def _head(opts: RenderOptions, cpu: str = "8", memory_gi: int = 32, serve: bool = False) -> dict:
    ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
             {"containerPort": 10001, "name": "client"}]
    if serve:
        ports.append({"containerPort": 8000, "name": "serve"})
    c = _container("ray-head", opts, cpu, f"{memory_gi}Gi", ports=ports)
    # num-cpus 0: the head runs drivers, GCS, dashboard, Serve controller; no tasks, actors or replicas.
    return {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _pod(c, opts.storage, max(1, memory_gi // 4), gpu=False)}


def _workers(opts: RenderOptions, group: str, gpus: int, cpus: int, memory_gi: int,
             replicas: int, min_replicas: int, max_replicas: int) -> dict:
    c = _container("ray-worker", opts, str(cpus), f"{memory_gi}Gi", gpus=gpus)
    return {"groupName": group, "replicas": replicas, "minReplicas": min_replicas, "maxReplicas": max_replicas,
            "rayStartParams": {}, "template": _pod(c, opts.storage, max(1, memory_gi // 4), gpu=bool(gpus))}


def _gpu_pod(opts: RenderOptions, gpus: int) -> tuple[int, int]:
    return opts.cpus_per_gpu * gpus, opts.memory_per_gpu_gi * gpus


def _metadata(name: str, component: str) -> dict:
    return {"name": name, "labels": {"app.kubernetes.io/name": "derta", "app.kubernetes.io/component": component}}


def runtime_env(opts: RenderOptions) -> dict | None:
    """None for the image path; the development runtime env for `code_url` (no `$`, see the module docstring)."""
    if not opts.code_url:
        return None
    url = opts.code_url
    if "$" in url or "`" in url or not re.match(r"(https?|s3|gs)://\S+\.zip$", url):
        raise RenderError(f"--code-url {url!r}: need a .zip URL (https://, s3://, gs://) without $ or `")
    env: dict[str, Any] = {"working_dir": url}
    if url.startswith(("http://", "https://")):  # pip installs from http(s) archives; s3/gs code runs from working_dir
        env["pip"] = {"packages": [f"derta @ {url}"], "pip_check": False}
    return env


def _rayjob(name: str, component: str, entrypoint: str, opts: RenderOptions, workers: list[dict],
            deadline_s: int) -> dict:
    spec: dict[str, Any] = {"entrypoint": entrypoint}
    env = runtime_env(opts)
    if env:
        spec["runtimeEnvYAML"] = yaml.safe_dump(env, sort_keys=False)
    spec.update({
        "submissionMode": "K8sJobMode",
        # Delete the Ray cluster (and free its GPUs) when the job ends; ttlSecondsAfterFinished delays that
        # deletion, so logs stay readable for 10 minutes. The RayJob object itself stays until deleted.
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 600,
        "activeDeadlineSeconds": deadline_s,
        # Ray Train retries worker failures from the last checkpoint (train.max_failures); don't re-run jobs.
        "backoffLimit": 0,
        "rayClusterSpec": {"rayVersion": ray_version(), "headGroupSpec": _head(opts), "workerGroupSpecs": workers},
    })
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _metadata(name, component), "spec": spec}


# ------------------------------------------------------------------------------------------ manifests
def _under_mount(path: str, opts: RenderOptions, fallback: str) -> str:
    return path if path.startswith(opts.mount.rstrip("/") + "/") else f"{opts.mount}/{fallback}"


def _train_gpus(cfg: DertaConfig) -> int:
    per_worker = (cfg.train.resources_per_worker or {}).get("GPU", 1 if cfg.train.use_gpu else 0)
    return int(math.ceil(cfg.train.num_workers * per_worker))


def _train_workers(cfg: DertaConfig, opts: RenderOptions) -> list[dict]:
    total = _train_gpus(cfg)
    if not total:  # CPU-only preset (tiny): one CPU pod with a core per Ray Train worker plus room for Ray Data
        cpus = max(4, 2 * cfg.train.num_workers)
        return [_workers(opts, "cpu", 0, cpus, 4 * cpus, 1, 1, 1)]
    # Equal pods of at most --gpus-per-pod GPUs: 12 GPUs on 8-GPU nodes -> 2 pods of 6.
    per_pod = max(d for d in range(1, min(opts.gpus_per_pod, total) + 1) if total % d == 0)
    pods = total // per_pod
    cpus, mem = _gpu_pod(opts, per_pod)
    # Fixed size (min = max = replicas): the job's placement group is known up front.
    return [_workers(opts, f"gpu-{per_pod}x", per_pod, cpus, mem, pods, pods, pods)]


def _serve_gpus(cfg: DertaConfig) -> int:
    return int(math.ceil(cfg.serve.ray_actor_options.get("num_gpus", 0) or 0))


def render(opts: RenderOptions) -> dict[str, dict]:
    """file name -> manifest for the preset."""
    opts.image = opts.image or default_image()
    preset_path = resolve_preset(opts.preset)
    if not preset_path.is_file():
        raise RenderError(f"--config {opts.preset}: no such preset or file ({preset_path})")
    cfg = load_config(preset_path)
    opts.direct_ingress = cfg.serve.direct_ingress
    preset = preset_path.stem
    # Presets are referenced by name: resolved from the installed checkout, whatever the driver's cwd.
    config_arg = preset if preset_path.resolve().parent == (REPO_ROOT / "configs").resolve() else str(preset_path)
    run_dir = _under_mount(cfg.train.output_dir, opts, f"runs/{preset}")
    model = opts.model or f"{run_dir}/final"
    if not model.startswith(opts.mount.rstrip("/") + "/") and model.startswith("/"):
        raise RenderError(f"--model {model}: pods only see {opts.mount} (the shared volume {opts.storage})")

    prepare = _rayjob(_name("prepare", preset), "prepare",
                      f"python -m jobs.prepare --config {config_arg} --output {opts.mount}/prepared/{preset}", opts,
                      [_workers(opts, "cpu", 0, 16, 64, 1, 1, 1)], deadline_s=6 * 3600)
    train = _rayjob(_name("train", preset), "train",
                    f"python -m jobs.train --config {config_arg} --output {run_dir}", opts,
                    _train_workers(cfg, opts), deadline_s=24 * 3600)
    eval_gpus = _serve_gpus(cfg) if cfg.train.use_gpu else 0
    eval_workers = ([_workers(opts, f"gpu-{eval_gpus}x", eval_gpus, *_gpu_pod(opts, eval_gpus), 1, 1, 1)]
                    if eval_gpus else [_workers(opts, "cpu", 0, 16, 64, 1, 1, 1)])
    evaluate = _rayjob(_name("eval", preset), "eval",
                       f"python -m jobs.eval --config {config_arg} --model {model} --output {opts.mount}/eval/{preset}",
                       opts, eval_workers, deadline_s=12 * 3600)
    return {"rayjob-prepare.yaml": prepare, "rayjob-train.yaml": train, "rayjob-eval.yaml": evaluate,
            "rayservice.yaml": _rayservice(cfg, config_arg, model, opts),
            "raycluster-autoscaler.yaml": _raycluster(opts)}


def serve_config(cfg: DertaConfig, config_arg: str, model: str, opts: RenderOptions) -> dict:
    """serve/serve_config.yaml with the preset's model and DertaModel sizing (serve.* keys) filled in."""
    doc = yaml.safe_load(SERVE_CONFIG.read_text())
    doc["http_options"]["keep_alive_timeout_s"] = cfg.serve.keep_alive_timeout_s
    (app,) = doc["applications"]
    app["args"] = {"config": config_arg, "model": model}
    env = runtime_env(opts)
    if env:
        app["runtime_env"] = env
    deployments = {d["name"]: d for d in app["deployments"]}
    replica = deployments["DertaModel"]
    replica["ray_actor_options"] = dict(cfg.serve.ray_actor_options)
    auto = cfg.serve.autoscaling
    if auto is not None:
        replica["autoscaling_config"].update(min_replicas=auto.min_replicas, max_replicas=auto.max_replicas,
                                             target_ongoing_requests=_plain(auto.target_ongoing_requests))
    replica["max_ongoing_requests"] = max(cfg.serve.max_ongoing_requests, cfg.serve.max_batch_size)
    replica["max_queued_requests"] = cfg.serve.max_queued_requests
    ingress = deployments["DertaIngress"]
    # The ingress holds every in-flight model request, so it must not throttle below the replicas' capacity.
    ingress["max_ongoing_requests"] = max(ingress["max_ongoing_requests"],
                                          replica["autoscaling_config"]["max_replicas"] * replica["max_ongoing_requests"])
    return doc


def _plain(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def _rayservice(cfg: DertaConfig, config_arg: str, model: str, opts: RenderOptions) -> dict:
    doc = serve_config(cfg, config_arg, model, opts)
    replica = next(d for d in doc["applications"][0]["deployments"] if d["name"] == "DertaModel")
    gpus = _serve_gpus(cfg)
    auto = replica["autoscaling_config"]
    workers = [_workers(opts, "cpu", 0, 4, 16, 1, 1, 2)]  # FastAPI ingress replicas
    if gpus:
        # One DertaModel replica per pod; the pod count follows Serve's replica autoscaling.
        cpus, mem = _gpu_pod(opts, gpus)
        lo = auto["min_replicas"]
        workers.append(_workers(opts, f"gpu-{gpus}x", gpus, cpus, mem, lo, lo, auto["max_replicas"]))
    cluster = {"rayVersion": ray_version(), "enableInTreeAutoscaling": True,
               "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 300,
                                     "imagePullPolicy": "IfNotPresent",
                                     "resources": {"requests": {"cpu": "500m", "memory": "512Mi"},
                                                   "limits": {"cpu": "500m", "memory": "512Mi"}}},
               "headGroupSpec": _head(opts, cpu="4", memory_gi=16, serve=True), "workerGroupSpecs": workers}
    return {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": _metadata("derta-serve", "serve"),
            "spec": {"serveConfigV2": yaml.safe_dump(doc, sort_keys=False, width=120), "rayClusterConfig": cluster}}


def _raycluster(opts: RenderOptions) -> dict:
    big_cpus, big_mem = _gpu_pod(opts, opts.gpus_per_pod)
    one_cpus, one_mem = _gpu_pod(opts, 1)
    workers = [_workers(opts, "cpu", 0, 16, 64, 0, 0, 4),                      # Ray Data preparation, CPU runs
               _workers(opts, "gpu-1x", 1, one_cpus, one_mem, 0, 0, 8),         # eval, Serve replicas, small models
               _workers(opts, f"gpu-{opts.gpus_per_pod}x", opts.gpus_per_pod, big_cpus, big_mem, 0, 0, 2)]  # training
    spec = {"rayVersion": ray_version(), "enableInTreeAutoscaling": True,
            "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 600,
                                  "imagePullPolicy": "IfNotPresent",
                                  "resources": {"requests": {"cpu": "500m", "memory": "512Mi"},
                                                "limits": {"cpu": "500m", "memory": "512Mi"}}},
            "headGroupSpec": _head(opts), "workerGroupSpecs": workers}
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _metadata("derta-cluster", "cluster"),
            "spec": spec}


# --------------------------------------------------------------------------------------------- output
class _Dumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2, runtimeEnvYAML) as `|` blocks, like a person would write them."""


def _str(dumper: yaml.SafeDumper, value: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)

_HOWTO = {
    "RayJob": "kubectl apply -f {file}; kubectl get rayjob {name} -w; kubectl logs -f job/{name}",
    "RayService": "kubectl apply -f {file}; kubectl get rayservice {name} -w; "
                  "kubectl port-forward svc/{name}-serve-svc 8000:8000",
    "RayCluster": "kubectl apply -f {file}; kubectl port-forward svc/{name}-head-svc 8265:8265; "
                  "ray job submit --address http://127.0.0.1:8265 -- python -m jobs.train --config ...",
}


def dump(file: str, manifest: dict, opts: RenderOptions) -> str:
    name, kind = manifest["metadata"]["name"], manifest["kind"]
    defaults, flags = RenderOptions(preset=opts.preset, image=default_image()), {
        "image": "--image", "storage": "--storage", "model": "--model", "gpus_per_pod": "--gpus-per-pod",
        "memory_per_gpu_gi": "--memory-per-gpu", "code_url": "--code-url"}
    args = " ".join([f"--config {opts.preset}"] + [f"{flag} {getattr(opts, key)}" for key, flag in flags.items()
                                                    if getattr(opts, key) != getattr(defaults, key)])
    head = (f"# Generated by `derta cluster render {args}`; edit the preset or the render options, not this file.\n"
            f"# {_HOWTO[kind].format(file=file, name=name)}\n"
            f"# Image: {opts.image} (./Dockerfile). Volume: PVC {opts.storage} at {opts.mount}. See docs/cluster.md.\n")
    return head + yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=120)


def write(opts: RenderOptions, out_dir: Path) -> list[Path]:
    manifests = render(opts)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for file, manifest in manifests.items():
        path = out_dir / file
        path.write_text(dump(f"{out_dir.name}/{file}", manifest, opts))
        paths.append(path)
    return paths
