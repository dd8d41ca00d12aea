"""Static checks of the cluster artifacts: ray_config.yaml (cluster launcher), cluster/*.yaml (KubeRay) and
serve/serve_config.yaml (Ray Serve). Nothing here starts Ray or a cluster; the whole module runs in ~2 s.

What each file is validated against:
- ray_config.yaml: the JSON schema Ray ships (ray/autoscaler/ray-schema.json, via jsonschema), then Ray's own
  offline `prepare_config` + `validate_config` (defaults merge, docker and per-node-type checks).
- serve/serve_config.yaml: `ray.serve.schema.ServeDeploySchema.model_validate`, plus `ray.serve.config.AutoscalingConfig`
  for each autoscaling_config (the deploy schema accepts it as a plain dict) and an unknown-key check (Ray's schema
  classes silently ignore unknown keys, so a typo such as `target_ongoing_request` would otherwise pass).
- cluster/*.yaml: structural checks of the KubeRay ray.io/v1 CRs and cross-file consistency (RayService.serveConfigV2
  vs serve/serve_config.yaml, GPU capacity vs the Serve/Train configs). Strict validation against the vendored
  KubeRay CRD schemas, the submitter's bash command and render sync are in tests/test_kuberay_manifests.py.
"""
from __future__ import annotations

import ast
import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")
ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parent.parent
RAY_CONFIG = REPO / "ray_config.yaml"
SERVE_CONFIG = REPO / "serve" / "serve_config.yaml"
RAYJOB = REPO / "cluster" / "rayjob-train.yaml"
RAYSERVICE = REPO / "cluster" / "rayservice.yaml"
RAYCLUSTER = REPO / "cluster" / "raycluster-autoscaler.yaml"
MANIFESTS = {RAYJOB: "RayJob", RAYSERVICE: "RayService", RAYCLUSTER: "RayCluster",
             REPO / "cluster" / "rayjob-prepare.yaml": "RayJob", REPO / "cluster" / "rayjob-eval.yaml": "RayJob"}
TRAIN_ENTRYPOINT = "jobs/train.py"  # the training entrypoint named by the repo conventions
TRAIN_MODULE = "jobs.train"  # the same, as the image runs it (`python -m jobs.train`)
DEPLOYMENTS = {"DertaIngress", "DertaModel"}
IMAGE_RE = re.compile(r"^rayproject/ray:(?P<version>\d+\.\d+\.\d+)-py(?P<py>\d{2,3})-(?P<flavor>gpu|cpu|cu\d+)$")
GPU = "nvidia.com/gpu"


# ---------------------------------------------------------------------------------------------- helpers
def _load(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: expected one YAML document, got {len(docs)}"
    assert isinstance(docs[0], dict), f"{path.name}: top level must be a mapping"
    return docs[0]


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _cluster_spec(path: Path) -> dict:
    return _cluster_spec_of(_load(path))


def _cluster_spec_of(doc: dict) -> dict:
    spec = doc["spec"]
    return {"RayJob": lambda: spec["rayClusterSpec"], "RayService": lambda: spec["rayClusterConfig"],
            "RayCluster": lambda: spec}[doc["kind"]]()


def _pod_specs(cluster_spec: dict):
    """(group name, is_head, group spec, pod spec) for the head and every worker group."""
    head = cluster_spec["headGroupSpec"]
    yield "head", True, head, head["template"]["spec"]
    for group in cluster_spec["workerGroupSpecs"]:
        yield group["groupName"], False, group, group["template"]["spec"]


def _gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get(GPU, 0))


def _gpu_capacity(cluster_spec: dict) -> list[tuple[int, int]]:
    """[(GPUs per pod, max pods)] for each GPU worker group."""
    out = []
    for _, is_head, group, pod in _pod_specs(cluster_spec):
        gpus = sum(_gpus(c) for c in pod["containers"])
        if gpus and not is_head:
            out.append((gpus, int(group["maxReplicas"])))
    return out


def _config_refs(text: str) -> set[str]:
    return set(re.findall(r"\bconfigs/[\w.\-]+\.ya?ml\b", text))


def _skip_missing_config(rel: str) -> Path:
    path = REPO / rel
    if not path.exists():
        pytest.skip(f"{rel} is referenced by the cluster configs but doesn't exist yet (presets are being written)")
    return path


def _train_argv(command: str) -> list[str]:
    argv = shlex.split(command)
    if argv[:3] == ["python", "-m", TRAIN_MODULE]:
        argv = ["python", TRAIN_ENTRYPOINT, *argv[3:]]
    assert argv[:2] == ["python", TRAIN_ENTRYPOINT], f"expected `python {TRAIN_ENTRYPOINT} ...`, got {command!r}"
    assert (REPO / TRAIN_ENTRYPOINT).is_file(), f"{TRAIN_ENTRYPOINT} missing from the repo"
    return argv


def _preset(ref: str) -> Path:
    """A preset path (configs/x.yaml) or a preset name (x, as the manifests pass it)."""
    from derta.config import resolve_preset

    return _skip_missing_config(str(resolve_preset(ref).relative_to(REPO)) if "/" not in ref else ref)


def _flag(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name:
            assert i + 1 < len(argv), f"{name} without a value in {argv}"
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


# ------------------------------------------------------------------------------------ cluster launcher
@pytest.fixture(scope="module")
def ray_config() -> dict:
    return _load(RAY_CONFIG)


def test_ray_config_matches_ray_schema(ray_config):
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(ray_config), key=lambda e: list(e.absolute_path))
    assert not errors, "ray_config.yaml violates ray-schema.json:\n" + "\n".join(
        f"  {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def test_ray_config_passes_ray_prepare_and_validate(ray_config):
    """What `ray up` does before touching the cloud: merge provider defaults, check docker + node types."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(ray_config))
    validate_config(prepared)
    head = prepared["head_node_type"]
    assert prepared["available_node_types"][head]["max_workers"] == 0
    # setup_commands are prepended to head/worker setup commands: install torch, then derta
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert prepared[key][: len(ray_config["setup_commands"])] == ray_config["setup_commands"]


def test_ray_config_node_types_and_autoscaling(ray_config):
    types = ray_config["available_node_types"]
    head = ray_config["head_node_type"]
    assert head in types
    assert types[head]["resources"].get("GPU", 0) == 0, "the head should be a CPU node"
    workers = {name: t for name, t in types.items() if name != head}
    gpu_types = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no autoscaling GPU worker type"
    for name, t in workers.items():
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"], name
        assert t["resources"].get("CPU", 0) > 0, f"{name}: declare CPU so the autoscaler can bin-pack"
    assert any(t.get("min_workers", 0) == 0 for t in gpu_types.values()), "GPU types should scale from zero"
    assert sum(t["max_workers"] for t in workers.values()) <= ray_config["max_workers"]
    assert ray_config["idle_timeout_minutes"] > 0
    assert ray_config["upscaling_speed"] > 0


def test_ray_config_installs_derta_from_the_synced_repo(ray_config):
    mounts = {str(k).rstrip("/"): str(v).rstrip("/") for k, v in ray_config["file_mounts"].items()}
    assert mounts.get("~/derta") == ".", f"file_mounts should map ~/derta to the repo root, got {mounts}"
    setup = ray_config["setup_commands"]
    torch_i = next(i for i, c in enumerate(setup) if re.search(r"pip install.*\btorch\b", c))
    derta_i = next(i for i, c in enumerate(setup) if "~/derta" in c and "pip install" in c and "-e ." in c)
    assert torch_i < derta_i, "install torch (the CUDA build you want) before `pip install -e .`"
    assert (REPO / "pyproject.toml").is_file()


def test_ray_config_sets_a_current_image_id_on_every_node_type(ray_config):
    """Without ImageId Ray falls back to its default AMI (Ubuntu 18.04, CUDA 11.2), too old for current CUDA torch."""
    for name, node_type in ray_config["available_node_types"].items():
        ami = node_type["node_config"].get("ImageId", "")
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}|resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
                            r"base-oss-nvidia-driver-gpu-ubuntu-2[2-9]\.04/latest/ami-id", ami), \
            f"{name}: ImageId {ami!r} is not a current NVIDIA-driver AMI"


def test_ray_config_mounts_shared_storage_by_default(ray_config):
    """/mnt/shared is one filesystem on every node: NFS-exported by the head, mounted by every worker type."""
    from ray.autoscaler._private.util import prepare_config

    prepared = prepare_config(copy.deepcopy(ray_config))
    head_cmds = " && ".join(prepared["initialization_commands"])
    assert "/etc/exports" in head_cmds and "exportfs" in head_cmds, "the head should export /mnt/shared"
    assert "-v /mnt/shared:/mnt/shared" in " ".join(prepared["docker"]["run_options"])
    for name, node_type in prepared["available_node_types"].items():
        if name == prepared["head_node_type"]:
            continue
        cmds = " && ".join(node_type.get("initialization_commands", []))
        # Ray runs worker initialization_commands with RAY_HEAD_IP exported (autoscaler with_head_node_ip).
        assert re.search(r"mount -t nfs4? .*\$RAY_HEAD_IP:/mnt/shared /mnt/shared", cmds), \
            f"{name}: does not mount the shared volume"


def test_ray_config_documents_the_flow():
    text = RAY_CONFIG.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for needle in ("ray up ray_config.yaml", "ray job submit", "--working-dir .", "ray down ray_config.yaml"):
        assert needle in header, f"top-of-file comment should document `{needle}`"
    submit = re.search(r"python (jobs/train\.py[^\n]*)", header)
    assert submit, "the documented job should run jobs/train.py"
    argv = _train_argv("python " + submit.group(1))
    assert _flag(argv, "--config") == "configs/llama3-8b-full-derta.yaml"
    assert _flag(argv, "--output")


# ------------------------------------------------------------------------------------------- KubeRay
@pytest.mark.parametrize("path", list(MANIFESTS), ids=_rel)
def test_manifest_kind_and_api(path):
    doc = _load(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == MANIFESTS[path]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), "not a DNS-1123 name"


@pytest.mark.parametrize("path", list(MANIFESTS), ids=_rel)
def test_manifest_cluster_structure(path):
    spec = _cluster_spec(path)
    from derta.cluster_render import ray_version

    assert spec["rayVersion"] == ray_version(), "rayVersion must match the Ray pin in pyproject.toml"
    assert "workerGroupSpecs" in spec and spec["workerGroupSpecs"], "no worker groups"
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(names) == len(set(names)), f"duplicate groupName in {names}"
    for group, is_head, gspec, pod in _pod_specs(spec):
        where = f"{_rel(path)}:{group}"
        params = gspec.get("rayStartParams")
        assert isinstance(params, dict), f"{where}: rayStartParams must be a mapping"
        assert all(isinstance(v, str) for v in params.values()), f"{where}: rayStartParams values must be strings"
        if is_head:
            assert params.get("dashboard-host") == "0.0.0.0", f"{where}: dashboard (job API) unreachable"
        else:
            mn, rep, mx = (gspec.get(k) for k in ("minReplicas", "replicas", "maxReplicas"))
            assert all(isinstance(v, int) for v in (mn, rep, mx)), f"{where}: min/replicas/max must be ints"
            assert 0 <= mn <= rep <= mx, f"{where}: need minReplicas <= replicas <= maxReplicas"
        containers = pod["containers"]
        assert containers, f"{where}: no containers"
        ray_container = containers[0]  # KubeRay runs `ray start` in the first container
        assert ray_container.get("image"), f"{where}: no image"
        res = ray_container.get("resources", {})
        for kind in ("cpu", "memory"):
            assert kind in res.get("limits", {}), f"{where}: set a {kind} limit (KubeRay derives Ray resources from it)"
        gpus = _gpus(ray_container)
        if GPU in res.get("requests", {}):
            assert int(res["requests"][GPU]) == gpus, f"{where}: {GPU} request must equal the limit"
        if is_head:
            assert gpus == 0, f"{where}: the head should not hold GPUs"
        elif "gpu" in group.lower():
            assert gpus >= 1, f"{where}: GPU group without a {GPU} limit"
            tolerated = {t.get("key") for t in pod.get("tolerations", [])}
            assert GPU in tolerated, f"{where}: tolerate the {GPU} taint GPU node pools usually carry"
        else:
            assert gpus == 0, f"{where}: non-GPU group name with GPUs"
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for c in containers:
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{where}: volumeMount {mount['name']!r} has no volume"


def test_rayjob_runs_the_training_entrypoint():
    doc = _load(RAYJOB)
    spec = doc["spec"]
    argv = _train_argv(spec["entrypoint"])
    config = _flag(argv, "--config")
    assert config, "--config is required"
    _preset(config)
    output = _flag(argv, "--output")
    assert output, "--output is required so the run lands on shared storage"
    head_pod = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = [m["mountPath"] for c in head_pod["containers"] for m in c.get("volumeMounts", [])]
    assert any(output.startswith(m.rstrip("/") + "/") for m in mounts), \
        f"--output {output} is not on a volume mounted in the head pod ({mounts}); the driver writes it"
    for group, is_head, _, pod in _pod_specs(spec["rayClusterSpec"]):
        if not is_head:
            worker_mounts = [m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])]
            assert any(output.startswith(m.rstrip("/") + "/") for m in worker_mounts), \
                f"{group}: Ray Train workers checkpoint under --output; mount the same volume on worker pods"
    assert spec.get("shutdownAfterJobFinishes") is True, "tear the GPU cluster down when the job ends"


def test_rayjob_fits_its_gpu_group():
    spec = _load(RAYJOB)["spec"]
    argv = _train_argv(spec["entrypoint"])
    path = _preset(_flag(argv, "--config"))
    from derta.config import load_config

    train = load_config(path).train
    assert train.use_gpu, f"{_rel(path)}: the RayJob runs on GPU pods but train.use_gpu is false"
    per_worker = (train.resources_per_worker or {}).get("GPU", 1)
    capacity = sum(g * n for g, n in _gpu_capacity(spec["rayClusterSpec"]))
    assert train.num_workers * per_worker <= capacity, \
        f"train.num_workers={train.num_workers} x {per_worker} GPU > {capacity} GPUs in the RayJob's worker groups"


def test_rayservice_embeds_serve_config():
    """serveConfigV2 is serve/serve_config.yaml with the preset's model and DertaModel sizing filled in."""
    from ray.serve.schema import ServeDeploySchema

    embedded_text = _load(RAYSERVICE)["spec"]["serveConfigV2"]
    assert isinstance(embedded_text, str), "serveConfigV2 must be a YAML string (use a `|` block)"
    embedded = yaml.safe_load(embedded_text)
    ServeDeploySchema.model_validate(embedded)
    template = _load(SERVE_CONFIG)
    assert {k: v for k, v in embedded.items() if k != "applications"} == \
        {k: v for k, v in template.items() if k != "applications"}
    for ours, theirs in zip(embedded["applications"], template["applications"], strict=True):
        for key in ("name", "route_prefix", "import_path"):
            assert ours[key] == theirs[key], f"serveConfigV2 {key} drifted from serve/serve_config.yaml"
        assert [d["name"] for d in ours["deployments"]] == [d["name"] for d in theirs["deployments"]]
        assert ours["args"].get("model", "").startswith("/mnt/shared/"), "serve the tuned model from shared storage"


def test_rayservice_autoscaling_and_gpu_capacity():
    doc = _load(RAYSERVICE)
    cluster = doc["spec"]["rayClusterConfig"]
    assert cluster.get("enableInTreeAutoscaling") is True, "pending Serve replicas need the Ray autoscaler"
    capacity = _gpu_capacity(cluster)
    assert capacity, "RayService needs a GPU worker group"
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    for app in serve_cfg["applications"]:
        for dep in app["deployments"]:
            need = dep.get("ray_actor_options", {}).get("num_gpus") or 0
            if not need:
                continue
            assert any(g >= need for g, _ in capacity), f"{dep['name']}: no pod with {need} GPUs"
            auto = dep["autoscaling_config"]
            slots = sum(int(g // need) * n for g, n in capacity)
            assert auto["max_replicas"] <= slots, \
                f"{dep['name']}: max_replicas={auto['max_replicas']} but GPU groups fit only {slots} replicas"


def test_raycluster_autoscaler():
    doc = _load(RAYCLUSTER)
    spec = doc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    opts = spec["autoscalerOptions"]
    assert opts["upscalingMode"] in {"Default", "Conservative", "Aggressive"}
    assert isinstance(opts["idleTimeoutSeconds"], int) and opts["idleTimeoutSeconds"] > 0
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert _gpus(head) == 0, "CPU head"
    gpu_groups = [g for g in spec["workerGroupSpecs"] if any(_gpus(c) for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "no GPU worker group"
    assert all(g["minReplicas"] == 0 < g["maxReplicas"] for g in gpu_groups), "GPU groups should scale from zero"


# ----------------------------------------------------------------------------------------------- Serve
@pytest.fixture(scope="module", params=["serve/serve_config.yaml", "cluster/rayservice.yaml"])
def serve_config(request) -> dict:
    if request.param.startswith("cluster/"):
        return yaml.safe_load(_load(REPO / request.param)["spec"]["serveConfigV2"])
    return _load(REPO / request.param)


def _check_known_keys(data: dict, model, where: str) -> None:
    fields = set()
    for name, field in model.model_fields.items():
        fields |= {name, field.alias} if field.alias else {name}
    unknown = set(data) - fields
    assert not unknown, f"{where}: keys {sorted(unknown)} are not fields of {model.__name__} (Ray ignores them)"


def test_serve_config_matches_ray_serve_schema(serve_config):
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (DeploymentSchema, RayActorOptionsSchema, ServeApplicationSchema,
                                  ServeDeploySchema)

    ServeDeploySchema.model_validate(serve_config)
    _check_known_keys(serve_config, ServeDeploySchema, "serve_config")
    for app in serve_config["applications"]:
        _check_known_keys(app, ServeApplicationSchema, f"application {app.get('name')}")
        for dep in app.get("deployments", []):
            where = f"deployment {dep.get('name')}"
            _check_known_keys(dep, DeploymentSchema, where)
            _check_known_keys(dep.get("ray_actor_options", {}), RayActorOptionsSchema, f"{where}.ray_actor_options")
            if dep.get("autoscaling_config"):
                _check_known_keys(dep["autoscaling_config"], AutoscalingConfig, f"{where}.autoscaling_config")
                AutoscalingConfig.model_validate(dep["autoscaling_config"])  # min <= max etc.


def test_serve_config_derta_application(serve_config):
    (app,) = serve_config["applications"]
    assert app["name"] == "derta" and app["route_prefix"] == "/"
    assert app["import_path"] == "serve.app:build_app"
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == DEPLOYMENTS
    model = deployments["DertaModel"]
    auto = model["autoscaling_config"]
    for key in ("min_replicas", "max_replicas", "target_ongoing_requests"):
        assert key in auto, f"DertaModel.autoscaling_config.{key} missing"
    assert "num_replicas" not in model, "num_replicas conflicts with autoscaling_config"
    for key in ("max_ongoing_requests", "max_queued_requests"):
        assert key in model
    opts = model["ray_actor_options"]
    assert "num_cpus" in opts and "num_gpus" in opts
    assert model["max_ongoing_requests"] >= auto["target_ongoing_requests"], \
        "target_ongoing_requests above max_ongoing_requests can never be reached"
    ingress = deployments["DertaIngress"]
    assert ingress["max_ongoing_requests"] >= auto["max_replicas"] * model["max_ongoing_requests"], \
        "the ingress holds every in-flight model request; it would throttle below the model's capacity"


def test_serve_config_args_config_exists(serve_config):
    (app,) = serve_config["applications"]
    config = app.get("args", {}).get("config")
    assert config, "args.config (the derta preset the app builds from) is missing"
    _preset(config)


def test_serve_import_path_resolves(serve_config):
    (app,) = serve_config["applications"]
    module, sep, attr = app["import_path"].partition(":")
    assert sep and module and attr and ":" not in attr, "import_path must be module:attr"
    base = REPO.joinpath(*module.split("."))
    source_file = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
    if not source_file.exists():
        pytest.skip(f"{module} ({_rel(base)}.py) isn't written yet")
    source = source_file.read_text()
    tree = ast.parse(source)
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    defined |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert attr in defined, f"{_rel(source_file)} defines no top-level {attr!r}"
    # Serve rejects a config that names a deployment the application doesn't build.
    pkg_sources = "\n".join(p.read_text() for p in source_file.parent.glob("*.py"))
    for name in DEPLOYMENTS:
        assert re.search(rf"\b{name}\b", pkg_sources), f"deployment {name} not found in {_rel(source_file.parent)}/"
    # The builder validates its args with a strict model when there is one (`BuildArgs`): every key must be a field.
    build_args = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "BuildArgs"), None)
    if build_args is not None:
        fields = {n.target.id for n in build_args.body
                  if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.target.id != "model_config"}
        unknown = set(app.get("args", {})) - fields
        assert not unknown, f"args {sorted(unknown)} are not BuildArgs fields {sorted(fields)}"


# ------------------------------------------------------------------------------------ config references
def _all_config_refs() -> list[str]:
    refs = set()
    for path in [RAY_CONFIG, SERVE_CONFIG, *MANIFESTS, REPO / "docs" / "cluster.md"]:
        if path.exists():
            refs |= _config_refs(path.read_text())
    return sorted(refs)


@pytest.mark.parametrize("rel", _all_config_refs())
def test_referenced_config_exists(rel):
    path = _skip_missing_config(rel)
    from derta.config import load_config

    load_config(path)  # the preset the cluster files point at must also validate


# serve.direct_ingress (derta's default): Serve reads these when `ray start` runs, so every node needs them
DIRECT_INGRESS_ENV = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
                      # HAProxy's own errors as 503 + Retry-After: the script, at its place in the image
                      "RAY_SERVE_HAPROXY_BINARY_PATH": "/home/ray/derta/serve/haproxy_503.sh"}


def test_haproxy_503_script_is_where_the_image_has_it():
    import os

    in_repo = REPO / DIRECT_INGRESS_ENV["RAY_SERVE_HAPROXY_BINARY_PATH"].removeprefix("/home/ray/derta/")
    assert in_repo.is_file() and os.access(in_repo, os.X_OK), in_repo


@pytest.mark.parametrize("path", list(MANIFESTS), ids=lambda p: p.name)
def test_every_ray_node_starts_with_direct_ingress_behind_haproxy(path):
    for group, _, _, pod in _pod_specs(_cluster_spec(path)):
        env = {e["name"]: e.get("value") for e in pod["containers"][0].get("env", [])}
        missing = {k: v for k, v in DIRECT_INGRESS_ENV.items() if env.get(k) != v}
        assert not missing, f"{_rel(path)}:{group}: the ray container's env lacks {missing}"


def test_launcher_nodes_start_with_direct_ingress_behind_haproxy(ray_config):
    options = " ".join(ray_config["docker"]["run_options"])
    for key, value in DIRECT_INGRESS_ENV.items():
        assert f"-e {key}={value}" in options, f"ray_config.yaml docker.run_options: -e {key}={value} missing"


def test_the_serve_service_port_is_the_one_haproxy_listens_on():
    """HAProxy takes Serve's HTTP port (http_options.port): the head's `serve` containerPort must be that port."""
    doc = _load(RAYSERVICE)
    port = yaml.safe_load(doc["spec"]["serveConfigV2"])["http_options"]["port"]
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": port, "name": "serve"} in head["ports"]


def test_a_preset_without_direct_ingress_renders_without_haproxy(tmp_path):
    """serve.direct_ingress: false in the preset is the off switch on a cluster too: Serve's Python proxy."""
    from derta.cluster_render import RenderOptions, render

    preset = yaml.safe_load((REPO / "configs" / "llama3-8b-full-derta.yaml").read_text())
    preset["serve"]["direct_ingress"] = False
    path = tmp_path / "no-direct.yaml"
    path.write_text(yaml.safe_dump(preset))
    for name, manifest in render(RenderOptions(preset=str(path), image="registry.example/derta:1")).items():
        for group, _, _, pod in _pod_specs(_cluster_spec_of(manifest)):
            names = {e["name"] for e in pod["containers"][0].get("env", [])}
            assert not names & set(DIRECT_INGRESS_ENV), f"{name}:{group}: {sorted(names)}"
