"""The KubeRay manifests read the way the operator and the API server read them. No cluster, no Ray; ~5 s.

- Strict schema validation against the openAPIV3Schema of the KubeRay v1 CRDs (tests/kuberay_crds/, vendored from
  ray-project/kuberay at the documented minimum operator version). Like the API server's strict field validation,
  an unknown field is an error wherever the CRD does not preserve unknown fields.
- The `ray job submit` command KubeRay's submitter runs (ray-operator/controllers/ray/common/job.go,
  BuildJobSubmitCommand: the runtime-env JSON goes through Go's strconv.Quote, the pieces are joined with spaces
  and run by `/bin/bash -ce --`), executed by a real bash with a fake `ray` that records its argv.
- `derta cluster render` output == the checked-in cluster/ files; every preset renders to valid manifests.
- Names unique per namespace (also the Services KubeRay derives from them), images pinned to the Ray pin.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

from derta import cluster_render  # noqa: E402
from derta.cluster_render import MANIFEST_FILES, RenderOptions, default_image, ray_version, render  # noqa: E402
from derta.config import CONFIG_DIR, load_config, resolve_preset  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
CRD_DIR = Path(__file__).parent / "kuberay_crds"
KUBERAY_MIN = (CRD_DIR / "VERSION").read_text().strip()  # the tag the schemas were vendored from
CHECKED_IN_PRESET = "llama3-8b-full-derta"
PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
CODE_URL = "https://github.com/example/derta/archive/0123456789abcdef0123456789abcdef01234567.zip"


def _checked_in() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(CLUSTER.glob("*.yaml"))}


# ------------------------------------------------------------------------------------- strict CRD schema
def _strict(node):
    """The CRD schema as the API server applies it: unknown fields rejected unless x-kubernetes-preserve-unknown-fields,
    int-or-string accepted as either, nullable accepts null."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


_VALIDATORS: dict[str, object] = {}


def _validator(kind: str):
    if kind not in _VALIDATORS:
        schema = _strict(json.loads((CRD_DIR / f"{kind.lower()}.v1.schema.json").read_text()))
        _VALIDATORS[kind] = jsonschema.Draft7Validator(schema)
    return _VALIDATORS[kind]


def crd_errors(doc: dict) -> list[str]:
    kind = doc.get("kind")
    if kind not in ("RayJob", "RayService", "RayCluster"):
        return [f"kind {kind!r} is not a KubeRay v1 kind"]
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in _validator(kind).iter_errors(doc)]
    if doc.get("apiVersion") != "ray.io/v1":
        errors.append(f"apiVersion {doc.get('apiVersion')!r} != ray.io/v1")
    meta = doc.get("metadata", {})
    unknown = set(meta) - {"name", "namespace", "labels", "annotations"}
    if unknown:
        errors.append(f"metadata: unexpected fields {sorted(unknown)}")
    name = meta.get("name", "")
    if not DNS1123.fullmatch(name) or len(name) > cluster_render.MAX_NAME:
        errors.append(f"metadata.name {name!r}: need a DNS-1123 label of at most {cluster_render.MAX_NAME} chars")
    return errors


@pytest.mark.parametrize("file", MANIFEST_FILES)
def test_checked_in_manifest_passes_the_crd_schema_strictly(file):
    doc = yaml.safe_load((CLUSTER / file).read_text())
    errors = crd_errors(doc)
    assert not errors, f"cluster/{file} is rejected by KubeRay {KUBERAY_MIN}'s CRD schema:\n  " + "\n  ".join(errors)


def test_strict_validation_rejects_unknown_and_misplaced_fields():
    doc = yaml.safe_load((CLUSTER / "rayjob-train.yaml").read_text())
    assert not crd_errors(doc)
    typo = json.loads(json.dumps(doc))
    typo["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}
    assert any("rayStartParam" in e for e in crd_errors(typo))
    misplaced = json.loads(json.dumps(doc))
    misplaced["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}
    assert any("resource" in e for e in crd_errors(misplaced))
    wrong_type = json.loads(json.dumps(doc))
    wrong_type["spec"]["backoffLimit"] = "0"
    assert crd_errors(wrong_type)
    # Fields of newer operators than the documented minimum are unknown to it.
    newer = json.loads(json.dumps(doc))
    newer["spec"]["deletionStrategy"] = {"onSuccess": {"policy": "DeleteCluster"}}
    assert any("deletionStrategy" in e for e in crd_errors(newer))


def test_docs_state_the_vendored_minimum_kuberay_version():
    major_minor = re.match(r"v(\d+\.\d+)", KUBERAY_MIN).group(1)
    docs = (REPO / "docs" / "cluster.md").read_text()
    assert f"KubeRay operator >= {major_minor}" in docs, f"docs/cluster.md should name KubeRay >= {major_minor}"


# ------------------------------------------------------------------------------------ render and presets
def test_checked_in_manifests_are_render_output():
    assert sorted(p.name for p in CLUSTER.glob("*.yaml")) == sorted(MANIFEST_FILES)
    opts = RenderOptions(preset=CHECKED_IN_PRESET)
    for file, manifest in render(opts).items():
        expected = cluster_render.dump(f"cluster/{file}", manifest, opts)
        assert (CLUSTER / file).read_text() == expected, (
            f"cluster/{file} differs from the render; run `derta cluster render --config {CHECKED_IN_PRESET}`")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_renders_valid_manifests(preset):
    for code_url in (None, CODE_URL):
        manifests = render(RenderOptions(preset=preset, code_url=code_url, image="registry.example/derta:1"))
        for file, doc in manifests.items():
            errors = crd_errors(doc)
            assert not errors, f"{preset} {file}: " + "; ".join(errors)
            _check_entrypoint_and_paths(doc)


def test_render_cli_writes_the_options(tmp_path):
    from typer.testing import CliRunner

    from derta.cli import app

    result = CliRunner().invoke(app, ["cluster", "render", "--config", "llama3-70b-lora-derta", "-o", str(tmp_path),
                                      "--image", "reg.example/derta:2", "--storage", "fsx-claim",
                                      "--gpus-per-pod", "4", "--model", "/mnt/shared/runs/x/final"])
    assert result.exit_code == 0, result.output
    train = yaml.safe_load((tmp_path / "rayjob-train.yaml").read_text())
    (group,) = train["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    assert group["replicas"] == 2 and pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert pod["containers"][0]["image"] == "reg.example/derta:2"
    assert {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v} == {"fsx-claim"}
    service = yaml.safe_load((tmp_path / "rayservice.yaml").read_text())
    app_cfg = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    assert app_cfg["args"] == {"config": "llama3-70b-lora-derta", "model": "/mnt/shared/runs/x/final"}
    bad = CliRunner().invoke(app, ["cluster", "render", "--config", "no-such-preset", "-o", str(tmp_path)])
    assert bad.exit_code == 2 and "no-such-preset" in bad.output


def _mounts(pod: dict) -> list[str]:
    return [m["mountPath"].rstrip("/") for c in pod["containers"] for m in c.get("volumeMounts", [])]


def _pods(doc: dict):
    spec = {"RayJob": lambda s: s["rayClusterSpec"], "RayService": lambda s: s["rayClusterConfig"],
            "RayCluster": lambda s: s}[doc["kind"]](doc["spec"])
    yield spec["headGroupSpec"]["template"]["spec"]
    for group in spec["workerGroupSpecs"]:
        yield group["template"]["spec"]


def _on_every_pod(doc: dict, path: str) -> None:
    for pod in _pods(doc):
        assert any(path.startswith(m + "/") for m in _mounts(pod)), f"{path} is not on a volume of every pod"


def _check_entrypoint_and_paths(doc: dict) -> None:
    """Entrypoints import from the image, presets resolve, outputs and models are on the shared volume."""
    if doc["kind"] == "RayJob":
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[:2] == ["python", "-m"], argv
        module = REPO.joinpath(*argv[2].split(".")).with_suffix(".py")
        assert module.is_file(), f"entrypoint module {argv[2]} ({module}) does not exist"
        flags = dict(zip(argv[3::2], argv[4::2]))
        load_config(resolve_preset(flags["--config"]))
        for key in ("--output", "--model"):
            if key in flags:
                _on_every_pod(doc, flags[key])
    if doc["kind"] == "RayService":
        (app_cfg,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
        load_config(resolve_preset(app_cfg["args"]["config"]))
        _on_every_pod(doc, app_cfg["args"]["model"])


def test_train_eval_and_serve_use_the_same_model():
    docs = _checked_in()
    train = shlex.split(docs["rayjob-train.yaml"]["spec"]["entrypoint"])
    evaluate = shlex.split(docs["rayjob-eval.yaml"]["spec"]["entrypoint"])
    run_dir = train[train.index("--output") + 1]
    model = evaluate[evaluate.index("--model") + 1]
    assert model == f"{run_dir}/final"
    (app_cfg,) = yaml.safe_load(docs["rayservice.yaml"]["spec"]["serveConfigV2"])["applications"]
    assert app_cfg["args"]["model"] == model, "the RayService must serve the model the RayJob trains"
    assert resolve_preset(app_cfg["args"]["config"]) == resolve_preset(train[train.index("--config") + 1])


# ---------------------------------------------------------------------------- the submitter's bash command
def go_quote(text: str) -> str:
    """Go's strconv.Quote for the JSON KubeRay builds (printable non-ASCII stays as is)."""
    named = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v",
             "\\": "\\\\", '"': '\\"'}
    return '"' + "".join(named.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch)
                         for ch in text) + '"'


def go_yaml_to_json(runtime_env_yaml: str) -> str:
    """sigs.k8s.io/yaml.YAMLToJSON: compact JSON, Go's json.Marshal escapes <, > and &."""
    text = json.dumps(yaml.safe_load(runtime_env_yaml), separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def submitted_argv(rayjob: dict) -> list[str]:
    """Run KubeRay's K8sJobMode submitter command (job.go) in bash; returns the argv `ray job submit` receives."""
    spec = rayjob["spec"]
    address, job_id = "http://derta-head-svc:8265", "derta-job-id"
    cmd = ["if", "!", "ray", "job", "status", "--address", address, job_id, ">/dev/null", "2>&1", ";", "then",
           "ray", "job", "submit", "--address", address, "--no-wait"]
    if spec.get("runtimeEnvYAML"):
        cmd += ["--runtime-env-json", go_quote(go_yaml_to_json(spec["runtimeEnvYAML"]))]
    cmd += ["--submission-id", job_id, "--", spec["entrypoint"].strip(), ";", "fi", ";",
            "ray", "job", "logs", "--address", address, "--follow", job_id]
    # A fake `ray`: `job status` says "not submitted yet", `job submit` prints its argv as JSON.
    fake = ('ray() { if [ "$2" = status ]; then return 1; fi; '
            'if [ "$2" = submit ]; then python3 -c \'import json,sys; print(json.dumps(sys.argv[1:]))\' "$@"; fi; }; ')
    out = subprocess.run(["/bin/bash", "-ce", "--", fake + " ".join(cmd)], capture_output=True, text=True,
                         check=True, env={"PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def install_spec_problems(env: dict) -> list[str]:
    problems = []
    for key in ("pip", "uv"):
        if key in env:
            spec = env[key]
            packages = spec.get("packages", []) if isinstance(spec, dict) else spec
            if not packages or any(not str(p).strip() for p in packages):
                problems.append(f"{key} packages {packages!r} contain an empty install spec")
    if "conda" in env and not env["conda"]:
        problems.append("empty conda spec")
    return problems


def runtime_env_after_bash(rayjob: dict) -> tuple[dict | None, list[str]]:
    argv = submitted_argv(rayjob)
    sep = argv.index("--")
    assert argv[sep + 1:] == shlex.split(rayjob["spec"]["entrypoint"]), "entrypoint changed on its way through bash"
    if "--runtime-env-json" not in argv[:sep]:
        return None, argv
    return json.loads(argv[argv.index("--runtime-env-json") + 1]), argv


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("file", [f for f in MANIFEST_FILES if f.startswith("rayjob-")])
def test_checked_in_rayjob_survives_the_submitter_shell(file):
    doc = yaml.safe_load((CLUSTER / file).read_text())
    env, _ = runtime_env_after_bash(doc)
    if env is None:
        # The image path: the code must come with the image, which must then be the derta image, not stock Ray.
        images = {c["image"] for pod in _pods(doc) for c in pod["containers"]}
        assert not any(i.startswith("rayproject/ray:") for i in images), \
            f"{file}: no runtime env ships the code, but pods run the stock Ray image"
        return
    assert env == yaml.safe_load(doc["spec"]["runtimeEnvYAML"]), "bash changed the runtime env"
    assert not install_spec_problems(env)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_development_runtime_env_survives_the_submitter_shell():
    from ray.runtime_env import RuntimeEnv

    job = render(RenderOptions(preset=CHECKED_IN_PRESET, code_url=CODE_URL))["rayjob-train.yaml"]
    env, _ = runtime_env_after_bash(job)
    assert env == yaml.safe_load(job["spec"]["runtimeEnvYAML"]), "bash changed the runtime env"
    assert env["working_dir"] == CODE_URL
    assert not install_spec_problems(env) and env["pip"]["packages"]
    RuntimeEnv(**env)  # Ray's own validation of working_dir URI and pip spec
    s3 = render(RenderOptions(preset=CHECKED_IN_PRESET, code_url="s3://bucket/derta/abc.zip"))["rayjob-train.yaml"]
    s3_env, _ = runtime_env_after_bash(s3)
    assert s3_env == {"working_dir": "s3://bucket/derta/abc.zip"}  # pip can't fetch s3://; the code runs from there
    RuntimeEnv(**s3_env)
    for bad in ("https://x/${TAG}.zip", "https://x/`id`.zip", "https://x/derta.tar.gz", "./derta.zip"):
        with pytest.raises(ValueError):
            render(RenderOptions(preset=CHECKED_IN_PRESET, code_url=bad))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_old_placeholder_runtime_env_is_caught():
    """The bug this guards against: bash expands ${RAY_RUNTIME_ENV_CREATE_WORKING_DIR} to '' -> pip: ['']."""
    job = render(RenderOptions(preset=CHECKED_IN_PRESET, code_url=CODE_URL))["rayjob-train.yaml"]
    job["spec"]["runtimeEnvYAML"] = yaml.safe_dump(
        {"working_dir": CODE_URL, "pip": {"packages": ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"], "pip_check": False}})
    env, _ = runtime_env_after_bash(job)
    assert env["pip"]["packages"] == [""]
    assert install_spec_problems(env)


# ------------------------------------------------------------------------------------- names and images
def test_names_unique_per_namespace_including_derived_services():
    docs = _checked_in()
    names = [d["metadata"]["name"] for d in docs.values()]
    assert len(names) == len(set(names)), f"metadata.name collides: {names}"
    # What KubeRay creates from each name (utils.GenerateHeadServiceName, GenerateServeServiceName; newer operators
    # also give a RayJob a `<rayjob>-head-svc`, older ones `<rayjob>-<suffix>-head-svc`).
    derived = []
    for d in docs.values():
        name = d["metadata"]["name"]
        derived.append(f"{name}-head-svc")
        if d["kind"] == "RayService":
            derived.append(f"{name}-serve-svc")
    assert len(derived) == len(set(derived)), f"derived Services collide: {derived}"


def _images(text_or_doc) -> set[str]:
    return set(re.findall(r"image:\s*['\"]?([^\s'\"]+)", text_or_doc))


def test_ray_is_pinned_once_and_every_image_follows_the_pin():
    import ray

    pyproject = (REPO / "pyproject.toml").read_text()
    pins = re.findall(r'"ray\[[^\]]*\]==(\d+\.\d+\.\d+)"', pyproject)
    assert pins == [ray_version()], f"pyproject.toml needs exactly one `ray[...]==X.Y.Z`, found {pins}"
    version = pins[0]
    assert ray.__version__ == version, f"installed Ray {ray.__version__} != pin {version}; reinstall (`make setup`)"
    for path in [*sorted(CLUSTER.glob("*.yaml")), REPO / "ray_config.yaml"]:
        text = path.read_text()
        for tag in re.findall(r"rayproject/ray:(\S+)", text):
            assert tag.split("-")[0] == version, f"{path.name}: rayproject/ray:{tag} is not Ray {version}"
        for found in re.findall(r"rayVersion:\s*['\"]?([\d.]+)", text):
            assert found == version, f"{path.name}: rayVersion {found} != {version}"
    images = set().union(*(_images(p.read_text()) for p in CLUSTER.glob("*.yaml")))
    assert images == {default_image()}, f"cluster/ should run the Dockerfile's image {default_image()}, got {images}"
    assert version in default_image()
    dockerfile = (REPO / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.M))
    assert args["RAY_VERSION"] == version and args["PYTHON_TAG"] == cluster_render.PYTHON_TAG
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-(gpu|cu\d+)$", dockerfile, re.M)
    launcher = yaml.safe_load((REPO / "ray_config.yaml").read_text())["docker"]["image"]
    assert launcher in (cluster_render.ray_base_image(), default_image())


def test_dockerfile_builds_what_the_manifests_run():
    """The image's smoke test imports what the manifests name; those modules and the preset exist here."""
    dockerfile = (REPO / "Dockerfile").read_text()
    smoke = re.search(r'^RUN python -c "(import [^"]+)"$', dockerfile, re.M).group(1)
    modules = re.findall(r"import ([\w.]+(?:, [\w.]+)*)", smoke)[0].split(", ")
    for module in modules:
        base = REPO.joinpath(*module.split("."))
        assert base.with_suffix(".py").is_file() or (base / "__init__.py").is_file(), f"{module} missing"
    entrypoints = {shlex.split(d["spec"]["entrypoint"])[2] for d in _checked_in().values() if d["kind"] == "RayJob"}
    assert {"jobs.prepare", "jobs.train", "jobs.eval"} <= entrypoints
    assert "jobs.train" in modules and "serve.app" in modules
    for preset in re.findall(r"load_config\('([\w.-]+)'\)", smoke):
        assert resolve_preset(preset).is_file()
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored, "keep the build context small"


def test_render_splits_gpus_into_equal_pods():
    from derta.config import DertaConfig

    cfg = DertaConfig.model_validate({"train": {"num_workers": 12, "use_gpu": True}})
    (group,) = cluster_render._train_workers(cfg, RenderOptions(preset="x", image="i"))
    assert (group["replicas"], group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) \
        == (2, "6")


def test_torch_is_the_same_build_in_the_image_and_on_launcher_nodes():
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", (REPO / "Dockerfile").read_text(), re.M))
    setup = " ".join(yaml.safe_load((REPO / "ray_config.yaml").read_text())["setup_commands"])
    assert f'torch=={args["TORCH_VERSION"]}' in setup


def test_no_placeholders_in_files_users_apply():
    for path in [*sorted(CLUSTER.glob("*.yaml")), REPO / "ray_config.yaml", REPO / "Dockerfile"]:
        values = json.dumps(yaml.safe_load(path.read_text())) if path.suffix == ".yaml" else path.read_text()
        for pattern in (r"YOUR_", r"<[A-Z_]+>", r"XXXX", r"\bCHANGE_?ME\b"):
            assert not re.search(pattern, values), f"{path.name}: placeholder {pattern} in applied content"
