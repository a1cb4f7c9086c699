"""Deployment specs: Dockerfile, Ray cluster launcher config, KubeRay manifests, runtime env (cluster/).

Fast and offline: nothing here builds an image or talks to AWS or Kubernetes. Each check is a
function that returns a list of problems, run on the real files (expect none) and on deliberately
broken copies (expect some), so a check that can never fail would show up here.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any, Callable, Iterator

import jsonschema
import pytest
import yaml

import dockerfile_lint
from dockerfile_lint import dockerfile_instructions, dockerfile_problems

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "aws-a100.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
KUBERAY_SCHEMA = CLUSTER / "kuberay" / "kuberay-crd-v1.schema.json"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
REQUIREMENTS = ROOT / "requirements.txt"
GPUS_PER_NODE = 8  # p4d.24xlarge / the KubeRay GPU group


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def requirement_pins() -> dict[str, str]:
    return dockerfile_lint.requirement_pins(REQUIREMENTS.read_text())


# ---------------------------------------------------------------------------------------------------
# Every YAML parses


def test_every_yaml_parses():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert {LAUNCHER, RAYCLUSTER, RAYJOB, RUNTIME_ENV} <= set(files)
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected one or more mappings"


# ---------------------------------------------------------------------------------------------------
# Ray cluster launcher config against Ray's own schema and validation


def ray_launcher_problems(config: dict) -> list[str]:
    """What `ray up` would reject before touching AWS: Ray's ray-schema.json, prepare_config +
    validate_config, and its AWS check that NetworkInterfaces carry their own subnet and groups."""
    from ray.autoscaler._private.aws.config import _configure_subnets_and_groups_from_network_interfaces
    from ray.autoscaler._private.util import prepare_config, validate_config
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    problems = [f"ray-schema.json: {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                for e in jsonschema.Draft7Validator(schema).iter_errors(config)]
    if problems:
        return problems
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
        for name, node_type in config["available_node_types"].items():
            if "NetworkInterfaces" in node_type["node_config"]:
                _configure_subnets_and_groups_from_network_interfaces(node_type["node_config"])
    except (jsonschema.ValidationError, ValueError, RuntimeError, KeyError) as err:
        problems.append(f"ray validate_config: {err}")
    return problems


def test_launcher_validates_against_rays_schema():
    assert ray_launcher_problems(load(LAUNCHER)) == []


def _del(path: str) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        del node[last]
    return mutate


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value
    return mutate


LAUNCHER_BREAKS = {
    "no provider type": _del("provider.type"),
    "max_workers as string": _set("max_workers", "four"),
    "node type without node_config": _del("available_node_types.gpu_a100x8.node_config"),
    "node type without resources": _del("available_node_types.head.resources"),
    "GPU count as string": _set("available_node_types.gpu_a100x8.resources", {"GPU": "8"}),
    "run_options not a list": _set("docker.worker_run_options", "--shm-size=256g"),
    "unknown top-level key": _set("workers", 4),
    "unknown docker key": _set("docker.shm_size", "256g"),
    "head type not defined": _set("head_node_type", "missing"),
    "min_workers above max_workers": _set("available_node_types.gpu_a100x8.min_workers", 9),
    "EFA interface without subnet": _del("available_node_types.gpu_a100x8.node_config.NetworkInterfaces.1.SubnetId"),
    "subnet both on node and interfaces": _set("available_node_types.gpu_a100x8.node_config.SubnetIds", ["subnet-1"]),
}


@pytest.mark.parametrize("mutate", LAUNCHER_BREAKS.values(), ids=LAUNCHER_BREAKS.keys())
def test_broken_launcher_copies_fail(mutate):
    config = load(LAUNCHER)
    mutate(config)
    assert ray_launcher_problems(config)


def _shm_bytes(options: list[str]) -> int:
    for opt in options:
        m = re.match(r"--shm-size[= ](\d+)([bkmg]?)$", opt.strip().lower())
        if m:
            return int(m.group(1)) * {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[m.group(2)]
    return 0


def test_launcher_nodes_image_shm_efa_mlflow():
    cfg = load(LAUNCHER)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert not re.match(r"(p|g|trn|inf)\d", head["node_config"]["InstanceType"]), "the head is a CPU node"
    (worker,) = workers.values()
    assert worker["node_config"]["InstanceType"] == "p4d.24xlarge"
    assert worker.get("min_workers", 0) == 0 < worker["max_workers"] <= cfg["max_workers"], "autoscaled from zero"

    docker = cfg["docker"]
    assert docker["image"] == kuberay_images()[0], "the launcher and KubeRay run the same image"
    assert _shm_bytes(docker["worker_run_options"]) >= 64 * 2**30, "NCCL/DeepSpeed need a large /dev/shm"
    assert _shm_bytes(docker.get("head_run_options", []) + docker["run_options"]) >= 2**30
    opts = " ".join(docker["run_options"] + docker["worker_run_options"])
    assert "--gpus all" in opts and "memlock=-1" in opts
    interfaces = worker["node_config"]["NetworkInterfaces"]
    assert len(interfaces) == 4 and all(ni["InterfaceType"] == "efa" for ni in interfaces), "p4d: 4 EFA cards"
    assert "FI_PROVIDER=efa" in opts and "/dev/infiniband/uverbs0" in opts and "/opt/amazon" in opts

    head_cmds = " ".join(cfg["head_start_ray_commands"])
    assert "mlflow server" in head_cmds and "--artifacts-destination s3://" in head_cmds
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        assert "MLFLOW_TRACKING_URI" in " ".join(cmds)
    setup = cfg["initialization_commands"] + cfg["setup_commands"] + cfg["head_setup_commands"] + cfg["worker_setup_commands"]
    assert not any("pip install" in c or "conda install" in c for c in setup), "dependencies come from the image"


def test_launcher_uses_token_auth_and_instance_profiles():
    cfg = load(LAUNCHER)
    assert "-e RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", "the token reaches every node as a file"
    for name, node_type in cfg["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Arn") or profile.get("Name"), f"{name}: AWS access through an IAM instance profile"
    assert secret_problems(cfg, "aws-a100.yaml") == []


# ---------------------------------------------------------------------------------------------------
# KubeRay manifests against the schema derived from the KubeRay CRDs


def kuberay_problems(doc: Any) -> list[str]:
    schema = json.loads(KUBERAY_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def test_kuberay_schema_is_a_valid_json_schema_with_its_sources():
    schema = json.loads(KUBERAY_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    sources = " ".join(schema["x-sources"])
    assert "helm-chart/kuberay-operator/crds/ray.io_rayclusters.yaml" in sources and "ray.io_rayjobs.yaml" in sources


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=["raycluster", "rayjob"])
def test_kuberay_manifests_match_the_crd_schema(path):
    assert kuberay_problems(load(path)) == []


RC_HEAD = "spec.headGroupSpec"
RC_WORKER = "spec.workerGroupSpecs.0"
RC_WORKER_C = RC_WORKER + ".template.spec.containers.0"
KUBERAY_BREAKS = {
    "RayCluster: wrong apiVersion": ("rc", _set("apiVersion", "ray.io/v1alpha2")),
    "RayCluster: no metadata.name": ("rc", _del("metadata.name")),
    "RayCluster: name not DNS-1035": ("rc", _set("metadata.name", "RMT_dist")),
    "RayCluster: no headGroupSpec": ("rc", _del(RC_HEAD)),
    "RayCluster: head without template": ("rc", _del(RC_HEAD + ".template")),
    "RayCluster: head without containers": ("rc", _set(RC_HEAD + ".template.spec.containers", [])),
    "RayCluster: rayStartParams value not a string": ("rc", _set(RC_HEAD + ".rayStartParams.num-cpus", 0)),
    "RayCluster: worker without groupName": ("rc", _del(RC_WORKER + ".groupName")),
    "RayCluster: worker without maxReplicas": ("rc", _del(RC_WORKER + ".maxReplicas")),
    "RayCluster: replicas as string": ("rc", _set(RC_WORKER + ".replicas", "2")),
    "RayCluster: misspelt workerGroupSpecs": ("rc", lambda d: d["spec"].update(workerGroupSpec=d["spec"].pop("workerGroupSpecs"))),
    "RayCluster: GPU limit not a quantity": ("rc", lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]
                                             ["containers"][0]["resources"]["limits"].update({"nvidia.com/gpu": "eight"})),
    "RayCluster: memory limit as float": ("rc", _set(RC_WORKER_C + ".resources.limits.memory", 1.5)),
    "RayCluster: container without name": ("rc", _del(RC_WORKER_C + ".name")),
    "RayCluster: env without name": ("rc", _del(RC_WORKER_C + ".env.0.name")),
    "RayCluster: secretKeyRef without key": ("rc", _del(RC_WORKER_C + ".env.2.valueFrom.secretKeyRef.key")),
    "RayCluster: volume without name": ("rc", _del(RC_WORKER + ".template.spec.volumes.0.name")),
    "RayCluster: volumeMount without mountPath": ("rc", _del(RC_WORKER_C + ".volumeMounts.0.mountPath")),
    "RayCluster: misspelt container key": ("rc", _set(RC_WORKER_C + ".resource", {})),
    "RayCluster: auth mode unknown": ("rc", _set("spec.authOptions.mode", "password")),
    "RayJob: entrypoint not a string": ("rj", _set("spec.entrypoint", ["python", "jobs/lm_wikitext.py"])),
    "RayJob: shutdownAfterJobFinishes not a bool": ("rj", _set("spec.shutdownAfterJobFinishes", "yes")),
    "RayJob: no cluster at all": ("rj", _del("spec.rayClusterSpec")),
    "RayJob: TTL without shutdown": ("rj", _set("spec.shutdownAfterJobFinishes", False)),
    "RayJob: unknown submissionMode": ("rj", _set("spec.submissionMode", "SSHMode")),
    "RayJob: name too long": ("rj", _set("metadata.name", "r" * 48)),
    "RayJob: embedded cluster without headGroupSpec": ("rj", _del("spec.rayClusterSpec.headGroupSpec")),
}


@pytest.mark.parametrize("which,mutate", KUBERAY_BREAKS.values(), ids=KUBERAY_BREAKS.keys())
def test_broken_kuberay_copies_fail(which, mutate):
    doc = load(RAYCLUSTER if which == "rc" else RAYJOB)
    mutate(doc)
    assert kuberay_problems(doc)


def pod_templates(cluster_spec: dict) -> Iterator[tuple[str, dict]]:
    yield "head", cluster_spec["headGroupSpec"]["template"]
    for group in cluster_spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]


def kuberay_images() -> list[str]:
    images = []
    for path in (RAYCLUSTER, RAYJOB):
        doc = load(path)
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        images += [c["image"] for _, t in pod_templates(spec) for c in t["spec"]["containers"]]
    return images


def test_rayjob_cluster_is_the_raycluster():
    assert load(RAYJOB)["spec"]["rayClusterSpec"] == load(RAYCLUSTER)["spec"], "the two manifests drifted apart"


def test_kuberay_gpu_group_shm_and_images():
    spec = load(RAYCLUSTER)["spec"]
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu_groups, "a GPU worker group"
    for group in gpu_groups:
        res = group["template"]["spec"]["containers"][0]["resources"]
        assert int(res["limits"]["nvidia.com/gpu"]) == GPUS_PER_NODE
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"], "extended resources: requests == limits"
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    for name, template in pod_templates(spec):
        shm = {v["name"] for v in template["spec"].get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"}
        assert shm, f"{name}: a memory-backed emptyDir for /dev/shm"
        for container in template["spec"]["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert mounts.get("/dev/shm") in shm, f"{name}/{container['name']}: /dev/shm not mounted from memory"
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
    images = set(kuberay_images())
    assert len(images) == 1, f"one image everywhere, got {images}"
    assert spec["rayVersion"] == requirement_pins()["ray"]


def test_kuberay_credentials_come_from_secrets():
    for path in (RAYCLUSTER, RAYJOB):
        doc = load(path)
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec["authOptions"]["mode"] == "token", "Ray token auth, token in an operator-made Secret"
        for name, template in pod_templates(spec):
            env = {e["name"]: e for c in template["spec"]["containers"] for e in c.get("env", [])}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert "secretKeyRef" in env[key]["valueFrom"] and "value" not in env[key], f"{path.name}/{name}: {key}"
        assert secret_problems(doc, path.name) == []


# ---------------------------------------------------------------------------------------------------
# The RayJob's entrypoint is a command the job actually accepts, and it fits the cluster


def _entrypoint_argv() -> list[str]:
    return shlex.split(load(RAYJOB)["spec"]["entrypoint"])


def test_rayjob_entrypoint_is_the_paper_run():
    spec = load(RAYJOB)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] == "K8sJobMode"
    argv = _entrypoint_argv()
    assert argv[:2] == ["python", "jobs/lm_wikitext.py"] and (ROOT / argv[1]).is_file()
    text = " ".join(argv)
    assert "--preset paper --scaling.num_workers 16 --scaling.use_gpu true" in text
    assert re.search(r"--storage\.path s3://\S+", text) and re.search(r"--mlflow\.tracking_uri https?://\S+", text)
    runtime_env = yaml.safe_load(load(RAYJOB)["spec"]["runtimeEnvYAML"])
    from ray.runtime_env import RuntimeEnv

    # Ray checks that a local working_dir exists; this one exists in the image, not here.
    assert runtime_env.pop("working_dir") == dockerfile_workdir(), "the RayJob runs the code the image holds"
    RuntimeEnv(**runtime_env)


def _parse_entrypoint(presets: dict) -> Any:
    from rmt_dist.config import parse_args

    return parse_args(_entrypoint_argv()[2:], presets)


def test_rayjob_entrypoint_flags_parse_with_the_jobs_parser():
    """The flags exist and their values have the right types (on top of the config defaults)."""
    cfg = _parse_entrypoint({"paper": {}})
    assert cfg.scaling.num_workers == 16 and cfg.scaling.use_gpu is True
    assert cfg.storage.path.startswith("s3://") and cfg.mlflow.tracking_uri.startswith("http")


def test_rayjob_entrypoint_fits_the_cluster():
    from rmt_dist.presets import PRESETS

    cfg = _parse_entrypoint(PRESETS["lm_wikitext"])
    spec = load(RAYJOB)["spec"]["rayClusterSpec"]
    (group,) = spec["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers <= group["maxReplicas"] * int(limits["nvidia.com/gpu"])
    assert cfg.scaling.cpus_per_worker * int(limits["nvidia.com/gpu"]) <= int(limits["cpu"]), "CPUs for 8 workers per pod"
    launcher = load(LAUNCHER)
    (node,) = [v for k, v in launcher["available_node_types"].items() if k != launcher["head_node_type"]]
    assert cfg.scaling.num_workers <= node["max_workers"] * node["resources"]["GPU"]
    assert cfg.scaling.cpus_per_worker * node["resources"]["GPU"] <= node["resources"]["CPU"]


# ---------------------------------------------------------------------------------------------------
# runtime_env.yaml


def test_runtime_env_is_valid_and_ships_no_dependencies():
    from ray.runtime_env import RuntimeEnv

    env = load(RUNTIME_ENV)
    RuntimeEnv(**env)  # Ray's own validation: types of working_dir, excludes, env_vars (str -> str)
    assert set(env) <= {"working_dir", "excludes", "env_vars", "py_modules", "config"}, \
        "no pip/conda/uv/container: the image holds the dependencies"
    assert env["working_dir"] == "." and ".git" in env["excludes"]
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert secret_problems(env, "runtime_env.yaml") == []


# ---------------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_workdir() -> str:
    return [a for i, a in dockerfile_instructions(DOCKERFILE.read_text()) if i == "WORKDIR"][-1]


def _docker_texts() -> tuple[str, str, str]:
    return DOCKERFILE.read_text(), REQUIREMENTS.read_text(), DOCKERIGNORE.read_text()


def test_dockerfile_installs_exactly_requirements_on_a_matching_cuda_base():
    assert dockerfile_problems(*_docker_texts()) == []
    text = DOCKERFILE.read_text()
    assert re.search(r"^COPY\b.*\brequirements\.txt\b", text, re.M)
    assert "pyproject.toml" in text and "rmt_dist" in text, "the package is installed from the repo root"


DOCKER_BREAKS = {
    "extra package": lambda d, r, i: (d.replace("-r requirements.txt", "-r requirements.txt transformers"), r, i),
    "second pip install of a package": lambda d, r, i: (d.replace("RUN pip install --no-deps .", "RUN pip install einops && pip install --no-deps ."), r, i),
    "second requirements file": lambda d, r, i: (d.replace("-r requirements.txt", "-r requirements.txt -r extra.txt"), r, i),
    "constraints file": lambda d, r, i: (d.replace("-r requirements.txt", "-r requirements.txt -c constraints.txt"), r, i),
    "conda package": lambda d, r, i: (d.replace("RUN pip install --no-deps .", "RUN conda install -y numpy && pip install --no-deps ."), r, i),
    "no requirements install": lambda d, r, i: (d.replace("-r requirements.txt", ""), r, i),
    "project install pulls deps": lambda d, r, i: (d.replace("pip install --no-deps .", "pip install ."), r, i),
    "base CUDA 12.1 vs cu128 index": lambda d, r, i: (d.replace("py311-cu128", "py311-cu121"), r, i),
    "index cu126 vs base 12.8": lambda d, r, i: (d.replace("whl/cu128", "whl/cu126"), r, i),
    "Ray image version vs pin": lambda d, r, i: (d.replace("ray:2.60.0-", "ray:2.59.0-"), r, i),
    "Python 3.10 base": lambda d, r, i: (d.replace("-py311-", "-py310-"), r, i),
    "torch pin moved": lambda d, r, i: (d, r.replace("torch==2.13.0", "torch==2.12.0"), i),
    "torch unpinned": lambda d, r, i: (d, r.replace("torch==2.13.0", "torch"), i),
    "runs as root": lambda d, r, i: (d + "\nUSER root\n", r, i),
    "no ninja": lambda d, r, i: (d.replace("ninja-build ", ""), r, i),
    "dockerignore hides a copied dir": lambda d, r, i: (d, r, i + "\njobs\n"),
    "dockerignore hides README.md": lambda d, r, i: (d, r, i + "\n*.md\n"),
}


@pytest.mark.parametrize("mutate", DOCKER_BREAKS.values(), ids=DOCKER_BREAKS.keys())
def test_broken_dockerfile_copies_fail(mutate):
    assert dockerfile_problems(*mutate(*_docker_texts()))


def test_image_tag_names_the_pins():
    """The image the clusters pull is named for the Ray version and CUDA of the Dockerfile's base."""
    base = [a for i, a in dockerfile_instructions(DOCKERFILE.read_text()) if i == "FROM"][-1]
    cu = re.search(r"-cu(\d+)$", base).group(1)
    for image in kuberay_images() + [load(LAUNCHER)["docker"]["image"]]:
        assert f"ray{requirement_pins()['ray']}" in image and image.endswith(f"-cu{cu}"), image


# ---------------------------------------------------------------------------------------------------
# No secrets


SECRET_KEYS = {"aws_secret_access_key", "aws_access_key_id", "aws_session_token", "secretaccesskey", "accesskeyid",
               "password", "passwd", "token", "secret", "api_key", "apikey", "auth_token", "ray_auth_token"}
SECRET_NAME = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|API_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)
SECRET_VALUE_PATTERNS = [
    re.compile(r"(?<![A-Z0-9])(AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    # NAME=literal for a secret-looking NAME (docker -e, export, ...); $VAR / ${VAR} references are fine
    re.compile(r"\b[A-Za-z0-9_]*(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|API_KEY)[A-Za-z0-9_]*=(?![\s$'\"]|$)", re.I),
    re.compile(r"://[^/\s:@]+:[^/\s@]+@"),  # user:password@ in a URL
]


def secret_problems(node: Any, where: str) -> list[str]:
    problems: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("name"), str) and SECRET_NAME.search(node["name"]) and ("value" in node or "valueFrom" in node):
                if "value" in node or "secretKeyRef" not in (node.get("valueFrom") or {}):
                    problems.append(f"{where}:{path}: {node['name']} must come from valueFrom.secretKeyRef")
            for key, value in node.items():
                if str(key).lower() in SECRET_KEYS and isinstance(value, (str, int)) and value not in ("", None):
                    problems.append(f"{where}:{path}/{key}: a literal credential")
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{path}/{i}")
        elif isinstance(node, str):
            for pattern in SECRET_VALUE_PATTERNS:
                if pattern.search(node):
                    problems.append(f"{where}:{path}: looks like a secret ({pattern.pattern[:30]}...)")
            if "\n" in node and ":" in node:  # embedded YAML (runtimeEnvYAML)
                try:
                    walk(yaml.safe_load(node), path + "(yaml)")
                except yaml.YAMLError:
                    pass

    walk(node, "")
    return problems


def test_no_secrets_in_any_yaml_or_the_dockerfile():
    for path in sorted(CLUSTER.rglob("*.yaml")):
        text = path.read_text()
        for pattern in SECRET_VALUE_PATTERNS[:2]:  # also in comments
            assert not pattern.search(text), f"{path}: {pattern.pattern}"
        for doc in yaml.safe_load_all(text):
            assert secret_problems(doc, path.name) == []
    for instr, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if instr in ("ENV", "ARG"):
            assert not SECRET_NAME.search(args.split("=")[0]), f"Dockerfile {instr} {args}: no credentials in the image"


SECRET_BREAKS = {
    "env value literal": lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}),
    "mlflow password literal": lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2"}),
    "secret from a configMap": lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "RAY_AUTH_TOKEN", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "auth_token"}}}),
    "access key id in a string": lambda d: d["metadata"].update(annotations={"note": "AKIAIOSFODNN7EXAMPLE"}),
    "token key": lambda d: d["spec"].update(token="abc123"),
    "password in a URL": lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "MLFLOW_TRACKING_URI", "value": "http://admin:hunter2@mlflow:5000"}),
}


@pytest.mark.parametrize("mutate", SECRET_BREAKS.values(), ids=SECRET_BREAKS.keys())
def test_secret_check_catches_literals(mutate):
    doc = load(RAYCLUSTER)
    mutate(doc)
    assert secret_problems(doc, "raycluster.yaml")


@pytest.mark.parametrize("option", ["-e AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG", "--env MLFLOW_TRACKING_TOKEN=abc"])
def test_secret_check_catches_launcher_env_literals(option):
    cfg = load(LAUNCHER)
    cfg["docker"]["run_options"].append(option)
    assert secret_problems(cfg, "aws-a100.yaml")


# ---------------------------------------------------------------------------------------------------
# README


def test_readme_walks_through_launch_submit_watch_mlflow_teardown():
    text = (CLUSTER / "README.md").read_text()
    for needle in ("RAY_AUTH_MODE=token", "ray get-auth-token", "ray up", "ray job submit", "ray job logs", "ray down",
                   "kubectl apply -f cluster/kuberay/rayjob.yaml", "kubectl delete", "port-forward", "5000"):
        assert needle in text, needle
    for ref in set(re.findall(r"\bcluster/[\w./-]+\.(?:yaml|json|md)", text)):
        assert (ROOT / ref).is_file(), f"README names {ref}, which does not exist"
