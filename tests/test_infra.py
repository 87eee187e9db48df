"""infra/: every file parses, the manifests have what a cluster needs, the versions match the project's pins,
and no credential is written inline."""

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from pipeline.config import PretrainConfig, load_config, parse_set_overrides

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
DOCKER_INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "EXPOSE", "ENTRYPOINT",
                       "CMD", "LABEL", "HEALTHCHECK", "SHELL", "VOLUME", "STOPSIGNAL", "ONBUILD"}


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def python_tag() -> str:
    """'py311' from requires-python '>=3.11,...' (the version the lock was made with)."""
    major, minor = re.search(r">=\s*(\d+)\.(\d+)", project()["requires-python"]).groups()
    return f"py{major}{minor}"


def image_tag() -> str:
    return f"anatdiff:{project()['version']}-ray{lock_pins()['ray']}-{python_tag()}-gpu"


def load(rel: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / rel).read_text()) if d is not None]


def dockerfile_lines(path: Path) -> list[str]:
    """Logical lines (continuations joined), comments and blanks dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec["template"]["spec"]["containers"]


# ----------------------------------------------------------------------------------------------- parsing
def test_every_infra_file_parses():
    files = [p for p in INFRA.rglob("*") if p.is_file()]
    yamls = [p for p in files if p.suffix in (".yaml", ".yml")]
    dockerfiles = [p for p in files if p.name == "Dockerfile"]
    assert len(yamls) >= 7 and len(dockerfiles) == 2, files
    for p in yamls:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), p
    for p in dockerfiles:
        lines = dockerfile_lines(p)
        assert lines[0].startswith("FROM "), p
        for ln in lines:
            assert ln.split()[0] in DOCKER_INSTRUCTIONS, f"{p}: {ln[:60]}"


# ----------------------------------------------------------------------------------------------- images
def test_cluster_image_is_rays_gpu_image_at_our_pins_and_installs_the_lock():
    lines = dockerfile_lines(INFRA / "docker" / "Dockerfile")
    pins = lock_pins()
    assert lines[0] == f"FROM rayproject/ray:{pins['ray']}-{python_tag()}-gpu"
    text = " ".join(lines)
    assert "-r requirements.lock" in text and "--no-deps -e ." in text
    assert f"torch=={pins['torch']}" in text  # the CUDA build of the pinned torch


def test_every_version_written_in_infra_matches_the_lock():
    pins = lock_pins()
    checked = set()
    for p in INFRA.rglob("*"):
        if not p.is_file():
            continue
        text = p.read_text()
        for name, version in re.findall(r"\b([A-Za-z][A-Za-z0-9_.-]*)==([0-9][0-9A-Za-z.+-]*)", text):
            key = name.lower().replace("_", "-")
            if key in pins:
                assert version == pins[key], f"{p.relative_to(REPO)}: {name}=={version}, lock has {pins[key]}"
                checked.add(key)
        for tag_version in re.findall(r"rayproject/ray:([0-9.]+)", text):
            assert tag_version == pins["ray"], p
        for tag_version in re.findall(r"anatdiff-mlflow:([0-9.]+)", text):
            assert tag_version == pins["mlflow"], p
    assert {"torch", "ray", "mlflow"} <= checked


def test_dockerignore_keeps_envs_outputs_and_secrets_out_of_the_build_context():
    lines = [ln.strip() for ln in (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "**"  # everything out, then only what the Dockerfile copies back in
    assert {"!requirements.lock", "!pyproject.toml", "!pipeline/**", "!jobs/**"} <= set(lines)
    assert not any(ln.startswith("!") and (".venv" in ln or "mlflow.db" in ln or ".git" in ln) for ln in lines)


def manifest_images() -> list[tuple[str, str]]:
    out = []
    for rel in ("kuberay/raycluster.yaml", "kuberay/rayjob-pretrain.yaml", "cluster-launcher/aws.yaml",
                "cluster-launcher/gcp.yaml"):
        out += [(rel, m) for m in re.findall(r"image:\s*(\S+)", (INFRA / rel).read_text())]
    return out


def test_manifests_run_our_image_tag():
    images = manifest_images()
    assert len(images) >= 6
    for rel, image in images:
        assert image.endswith(image_tag()), f"{rel}: {image} (expected .../{image_tag()})"


# ---------------------------------------------------------------------------------------------- KubeRay
def ray_cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


@pytest.mark.parametrize("rel,kind", [("kuberay/raycluster.yaml", "RayCluster"),
                                      ("kuberay/rayjob-pretrain.yaml", "RayJob")])
def test_kuberay_cluster_is_private_authenticated_and_scales_gpus_from_zero(rel, kind):
    (doc,) = load(rel)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    spec = ray_cluster_spec(doc)
    assert spec["rayVersion"] == lock_pins()["ray"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"  # never LoadBalancer / NodePort: not exposed publicly
    assert str(head["rayStartParams"]["num-cpus"]) == "0"
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
        for c in containers(group):
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    for pod in [head] + groups:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {"data": "anatdiff-data"}  # memory-mapped volumes need a shared filesystem
        for c in containers(pod):
            env = {e["name"]: e for e in c.get("env", [])}
            assert "secretKeyRef" in env["MLFLOW_TRACKING_URI"]["valueFrom"]
            assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    (pvc,) = load("kuberay/data-pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_rayjob_entrypoint_runs_an_existing_job_with_an_existing_valid_preset():
    (doc,) = load("kuberay/rayjob-pretrain.yaml")
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:3] == ["cd", "/home/ray/anatdiff", "&&"]  # the Dockerfile's WORKDIR holds the code
    assert "WORKDIR /home/ray/anatdiff" in dockerfile_lines(INFRA / "docker" / "Dockerfile")
    argv = argv[3:]
    assert argv[:2] == ["python", "-m"]
    module = argv[2]
    assert module == "jobs.pretrain" and (REPO / (module.replace(".", "/") + ".py")).is_file()
    config = argv[argv.index("--config") + 1]
    assert (REPO / config).is_file(), config
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(PretrainConfig, REPO / config, parse_set_overrides(sets))
    assert cfg.scaling.use_gpu and cfg.storage_path.startswith("s3://")
    assert cfg.data.startswith("/data/")  # on the shared claim every pod mounts (patches are memory-mapped)
    gpus = sum(g["maxReplicas"] for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert gpus >= cfg.scaling.num_workers  # the job's GPU workers fit the cluster


# ------------------------------------------------------------------------------------- cluster launcher
@pytest.mark.parametrize("rel,cloud,instance", [("cluster-launcher/aws.yaml", "aws", "g5.xlarge"),
                                                ("cluster-launcher/gcp.yaml", "gcp", "a2-highgpu-1g")])
def test_cluster_launcher_gpu_nodes_from_zero_on_our_image_with_no_setup(rel, cloud, instance):
    (doc,) = load(rel)
    assert doc["provider"]["type"] == cloud
    assert doc["docker"]["image"].endswith(image_tag())
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands"):
        assert doc.get(key, []) == [], key
    workers = {k: v for k, v in doc["available_node_types"].items() if k != doc["head_node_type"]}
    assert workers
    for node in workers.values():
        assert node["min_workers"] == 0 and node["resources"]["GPU"] >= 1
    assert instance in yaml.safe_dump(workers)
    head = " ".join(doc["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token ray start" in head
    assert "RAY_AUTH_MODE=token ray start" in " ".join(doc["worker_start_ray_commands"])


# ------------------------------------------------------------------------------------------------ MLflow
def test_mlflow_server_postgres_backend_object_store_and_credentials_from_secrets():
    docs = {d["kind"]: d for d in load("mlflow/kubernetes.yaml")}
    assert docs["Service"]["spec"]["type"] == "ClusterIP"
    (c,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"]
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith(("s3://", "gs://"))
    entry = dockerfile_lines(INFRA / "mlflow" / "Dockerfile")[-1]
    assert entry.startswith("ENTRYPOINT") and '"server"' in entry
    (compose,) = load("mlflow/docker-compose.yaml")
    mlflow_svc = compose["services"]["mlflow"]
    assert mlflow_svc["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://mlflow:${POSTGRES_PASSWORD")
    assert all(p.startswith("127.0.0.1:") for p in mlflow_svc["ports"])  # not published beyond the VM
    assert "ports" not in compose["services"]["postgres"]


# ---------------------------------------------------------------------------------------------- secrets
SECRET_PATTERNS = [
    re.compile(r"(?i)(password|passwd|secret|token|access_key|api_key)[\w-]*\s*[:=]\s*['\"]?(?![$<{]|\s|$)"
               r"[A-Za-z0-9/+_.\-]{8,}"),
    re.compile(r"[a-z+]+://[^/\s:@]+:(?![$<{])[^@\s/]+@"),  # credentials inside a URL
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def inline_secrets(text: str) -> list[str]:
    return [m.group(0) for pat in SECRET_PATTERNS for m in pat.finditer(text)]


def test_secret_detector_catches_planted_literals_and_passes_references():
    assert inline_secrets("POSTGRES_PASSWORD: hunter2hunter2")
    assert inline_secrets("uri: postgresql://mlflow:hunter2@db:5432/mlflow")
    assert inline_secrets("aws_access_key_id = AKIAABCDEFGHIJKLMNOP")
    assert not inline_secrets("POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it}")
    assert not inline_secrets("postgresql://mlflow:<password>@<db-host>:5432/mlflow")
    assert not inline_secrets("- name: RAY_AUTH_TOKEN\n  valueFrom:")


def test_no_credentials_inline_in_infra():
    for p in INFRA.rglob("*"):
        if p.is_file():
            found = inline_secrets(p.read_text())
            assert not found, f"{p.relative_to(REPO)}: {found}"
