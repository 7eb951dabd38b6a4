"""Deployment files in infra/: validated against the schemas their tools use, and against each other.

* the KubeRay RayJob against infra/schemas/rayjob.schema.json (the CRD's structure for the fields
  used), plus what the schema cannot say: GPU limits on the GPU group, replicas in range, volumes
  that exist, an entrypoint the avforge CLI accepts;
* the Ray cluster launcher YAML against Ray's own ray-schema.json and Ray's validate_config;
* infra/gpu.yaml (the GPU overlay) on every recipe against avforge's config models, its GPU demand
  against the GPU node types;
* the Dockerfile's pins against pyproject.toml;
* the Slurm script with bash -n and by running it with stand-ins for srun, scontrol, ray, avforge.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import stat
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def _yaml(name: str) -> dict[str, Any]:
    data = yaml.safe_load((INFRA / name).read_text())
    assert isinstance(data, dict)
    return data


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _ray_pin() -> str:
    pins = [d for d in _pyproject()["project"]["dependencies"] if re.match(r"ray(\[.*\])?==", d)]
    assert len(pins) == 1
    return pins[0].split("==")[1]


def _gpu_quantity(container: dict[str, Any], kind: str) -> int:
    return int((container.get("resources", {}).get(kind) or {}).get("nvidia.com/gpu", 0))


# ---------------------------------------------------------------------- KubeRay RayJob


def _rayjob_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((INFRA / "schemas" / "rayjob.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_rayjob_matches_the_kuberay_crd_structure() -> None:
    job = _yaml("kuberay-rayjob.yaml")
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _rayjob_validator().iter_errors(job)]
    assert errors == []


@pytest.mark.parametrize(
    "breakage",
    [
        ("no entrypoint", lambda j: j["spec"].pop("entrypoint")),
        ("misspelt field", lambda j: j["spec"].update(shutdownAfterJobFinish=True)),
        ("wrong apiVersion", lambda j: j.update(apiVersion="ray.io/v1alpha1")),
        ("integer rayStartParams", lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0})),
        ("worker group without maxReplicas", lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("maxReplicas")),
        ("container without image", lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image")),
        ("bad quantity", lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]["limits"].update({"nvidia.com/gpu": "one"})),
    ],
    ids=lambda b: b[0],
)
def test_rayjob_schema_rejects_broken_manifests(breakage: tuple[str, Any]) -> None:
    job = copy.deepcopy(_yaml("kuberay-rayjob.yaml"))
    breakage[1](job)
    assert list(_rayjob_validator().iter_errors(job)), f"schema accepted a manifest with {breakage[0]}"


def test_rayjob_groups_gpus_volumes_and_entrypoint() -> None:
    from pipeline.cli import build_parser

    spec = _yaml("kuberay-rayjob.yaml")["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _ray_pin()
    head, workers = cluster["headGroupSpec"], {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert head["rayStartParams"]["num-cpus"] == "0"  # no tasks beside the driver
    assert set(workers) == {"cpu", "gpu"}
    pods = [head["template"]] + [g["template"] for g in workers.values()]
    images = {c["image"] for p in pods for c in p["spec"]["containers"]}
    assert len(images) == 1 and not next(iter(images)).endswith(":latest") and ":" in next(iter(images))
    for g in workers.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    for name, g in workers.items():
        (container,) = g["template"]["spec"]["containers"]
        limit, request = _gpu_quantity(container, "limits"), _gpu_quantity(container, "requests")
        if name == "gpu":
            assert limit >= 1 and request == limit  # extended resources: requests must equal limits
            assert int(g["rayStartParams"]["num-gpus"]) == limit
            tolerated = {t["key"] for t in g["template"]["spec"].get("tolerations", [])}
            assert "nvidia.com/gpu" in tolerated
        else:
            assert limit == request == 0 and "num-gpus" not in g["rayStartParams"]
    for pod in pods:  # every mount names a volume of its pod, and all pods share the data volume
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        for c in pod["spec"]["containers"]:
            assert {m["name"] for m in c["volumeMounts"]} <= set(volumes)
            assert any(m["mountPath"] == "/data" for m in c["volumeMounts"])
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "avforge-data"
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["avforge", "run"]
    args = build_parser().parse_args(argv[1:])
    assert args.address == "auto" and str(args.input).startswith("/data/") and str(args.output).startswith("/data/")
    assert args.recipe == "mmtrail" and [c.name for c in args.config] == ["gpu.yaml"]  # the overlay on a recipe
    head_mounts = {m["mountPath"]: m["name"] for m in head["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert head_mounts[str(args.config[-1].parent)] == "job-config"  # --config is read from the ConfigMap


# ---------------------------------------------------------------------- Ray cluster launcher


def _ray_schema() -> dict[str, Any]:
    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def test_cluster_launcher_config_passes_rays_schema() -> None:
    config = _yaml("ray-cluster.yaml")
    jsonschema.validate(config, _ray_schema())
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    validate_config(fillout_defaults(copy.deepcopy(config)))  # what `ray up` runs first


@pytest.mark.parametrize(
    "breakage",
    [
        ("no provider", lambda c: c.pop("provider")),
        ("unknown node type key", lambda c: c["available_node_types"]["gpu_worker"].update(gpus=1)),
        ("fractional resource", lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5)),
        ("commands not a list", lambda c: c.update(setup_commands="avforge --help")),
    ],
    ids=lambda b: b[0],
)
def test_rays_schema_rejects_broken_launcher_configs(breakage: tuple[str, Any]) -> None:
    config = copy.deepcopy(_yaml("ray-cluster.yaml"))
    breakage[1](config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, _ray_schema())


def test_cluster_launcher_node_types_image_and_mounts() -> None:
    config = _yaml("ray-cluster.yaml")
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    assert types["gpu_worker"]["resources"]["GPU"] >= 1
    assert "GPU" not in types["cpu_worker"]["resources"]
    assert "--gpus all" in types["gpu_worker"]["docker"]["worker_run_options"]
    for t in types.values():
        assert t.get("min_workers", 0) <= t.get("max_workers", config["max_workers"]) <= config["max_workers"]
    assert config["docker"]["image"] == _rayjob_image()
    # the image's ENTRYPOINT is avforge: the launcher's `docker run IMAGE bash` must override it
    assert any(o.startswith("--entrypoint=") for o in config["docker"]["run_options"])
    for target, source in config["file_mounts"].items():
        assert (ROOT / source).exists(), f"file_mounts source {source} missing"
        assert target.startswith("/")
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert starts.count("--metrics-export-port=8080") == 2
    assert "avforge --help" in " ".join(config["setup_commands"])


def _rayjob_image() -> str:
    head = _yaml("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]["headGroupSpec"]
    return str(head["template"]["spec"]["containers"][0]["image"])


# ---------------------------------------------------------------------- the GPU overlay on every recipe

MODEL_STAGES = {"asr", "audio_tags", "visual_tags", "visual_caption", "audio_caption", "caption_select", "text_embed",
                "fuse", "agreement", "judge"}
# GPUs the overlay keeps busy (num_gpus x pool_size, vLLM: tensor_parallel_size x replicas) per recipe,
# as infra/gpu.yaml and infra/README.md quote them
GPU_DEMAND = {"mmtrail": 7.75, "howtocaption": 6.25, "favd": 7.75, "valor": 7.75, "wavcaps": 6.0}


def _recipes() -> list[str]:
    from pipeline.config import recipe_names

    return [r for r in recipe_names() if r != "media"]


@pytest.mark.parametrize("recipe", sorted(GPU_DEMAND))
def test_gpu_overlay_on_each_recipe_fits_the_gpu_node_types(recipe: str) -> None:
    from pipeline.config import load_config
    from pipeline.registry import build_stages
    from pipeline.stage import StageContext

    assert sorted(GPU_DEMAND) == sorted(_recipes())
    plain = load_config(None, recipe=recipe)
    config = load_config(INFRA / "gpu.yaml", recipe=recipe)
    assert config.split == plain.split and config.fuse.preset == plain.fuse.preset  # the recipe's choices stay
    stages = build_stages(config, StageContext(staging_dir="/data/out/_staging"))
    gpu_stages = {s.name: s for s in stages if s.resources.gpus > 0}
    assert set(gpu_stages) == MODEL_STAGES & set(config.stages)  # every model stage runs on a GPU
    assert {"fuse", "judge"} <= set(gpu_stages)  # the LLM stages are part of every GPU job
    assert config.fuse.llm.backend == config.judge.llm.backend == "vllm"
    assert all(s.stateful for s in gpu_stages.values())  # GPU work runs in actor pools
    names = [s.name for s in stages]
    assert names.index("dedup") < min(names.index(n) for n in gpu_stages)  # no GPU time on duplicates
    if recipe != "wavcaps":
        assert {"visual_tags", "visual_caption"} <= set(names)  # the overlay turns the visual models on
        assert config.visual_caption.backend == "llm" and config.visual_caption.llm.backend == "vllm"

    rayjob_gpu = next(g for g in _yaml("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
                      if g["groupName"] == "gpu")  # fmt: skip
    per_pod = _gpu_quantity(rayjob_gpu["template"]["spec"]["containers"][0], "limits")
    launcher_gpu = _yaml("ray-cluster.yaml")["available_node_types"]["gpu_worker"]
    demand = sum(s.resources.gpus * s.resources.pool_size for s in gpu_stages.values())
    for per_node, max_nodes in ((per_pod, rayjob_gpu["maxReplicas"]),
                                (launcher_gpu["resources"]["GPU"], launcher_gpu["max_workers"])):  # fmt: skip
        assert all(s.resources.gpus <= per_node for s in gpu_stages.values())  # each actor fits one node
        assert demand <= per_node * max_nodes  # all pools fit the group at its largest
    assert demand == pytest.approx(GPU_DEMAND[recipe])
    assert str(GPU_DEMAND[recipe]) in (INFRA / "README.md").read_text()
    assert str(GPU_DEMAND[recipe]) in (INFRA / "gpu.yaml").read_text()


def test_gpu_overlay_sets_no_recipe_choices() -> None:
    overlay = _yaml("gpu.yaml")
    assert not {"stages", "split", "quality", "recipe"} & set(overlay)
    for stage in ("fuse", "judge"):
        assert "preset" not in overlay[stage]


# ---------------------------------------------------------------------- Dockerfile


def _dockerfile() -> tuple[list[tuple[str, str]], dict[str, str]]:
    text = (INFRA / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in logical.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            instructions.append((op.upper(), rest.strip()))
    args = {}
    for op, rest in instructions:
        if op == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
    return instructions, args


def test_dockerfile_base_system_packages_and_entrypoint() -> None:
    instructions, args = _dockerfile()
    (base,) = [rest for op, rest in instructions if op == "FROM"]
    image, _, tag = base.partition(":")
    assert image == "nvidia/cuda" and "runtime" in tag and re.match(r"\d+\.\d+\.\d+-", tag), base
    runs = " ".join(rest for op, rest in instructions if op == "RUN")
    apt = re.findall(r"apt-get install [^&]*", runs)
    assert any("ffmpeg" in a and "espeak-ng" in a for a in apt)
    assert args["PYTHON"] == "python3.11"
    requires = _pyproject()["project"]["requires-python"]
    assert ">=3.11" in requires and "<3.12" in requires
    (entry,) = [json.loads(rest) for op, rest in instructions if op == "ENTRYPOINT"]
    assert entry[-1] == "avforge"
    for op, rest in instructions:
        if op == "COPY":
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} missing"
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore and {"!pyproject.toml", "!pipeline/", "!stages/", "!schemas/", "!prompts/"} <= set(ignore)


# the pyproject extra each optional stage's packages come from
STAGE_EXTRAS = {
    "asr": "audio", "audio_tags": "audio", "visual_tags": "visual", "visual_caption": "visual",
    "visual_quality": "visual", "text_embed": "visual", "fingerprint": "dedup", "dedup": "dedup",
    "fuse": "llm", "judge": "llm",
}  # fmt: skip


@pytest.mark.parametrize("recipe", ["mmtrail", "wavcaps"])
def test_image_has_what_the_gpu_jobs_need(recipe: str) -> None:
    from pipeline.config import load_config

    _, args = _dockerfile()
    extras = set(args["AVFORGE_EXTRAS"].split(","))
    needed = {STAGE_EXTRAS[s] for s in load_config(INFRA / "gpu.yaml", recipe=recipe).stages if s in STAGE_EXTRAS}
    assert needed and needed <= extras, f"{recipe} + infra/gpu.yaml needs extras {sorted(needed - extras)} the image lacks"


def test_dockerfile_installs_only_pinned_dependencies() -> None:
    instructions, args = _dockerfile()
    pins = _pyproject()["project"]["optional-dependencies"]
    extras = args["AVFORGE_EXTRAS"].split(",")
    assert {"models", "visual", "cluster"} <= set(extras)
    for extra in extras:
        assert extra in pins, f"extra {extra} is not in pyproject.toml"
        unpinned = [r for r in pins[extra] if "==" not in r]
        assert not unpinned, f"extra {extra} has unpinned requirements {unpinned}"
    assert all("==" in d for d in _pyproject()["project"]["dependencies"])
    installs = [rest for op, rest in instructions if op == "RUN" and "pip install" in rest]
    assert installs
    for cmd in installs:
        words = shlex.split(cmd.split("pip install", 1)[1].split("&&", 1)[0])
        packages = [w for w in words if not w.startswith("-")]
        assert packages, cmd
        for p in packages:
            if p.startswith(".["):
                continue  # the project itself, from pyproject with its pins
            assert "==" in p, f"unpinned pip install of {p}"
            if p.startswith("ray"):
                assert p.split("==")[1] == _ray_pin()
        assert not any(re.match(r"torch(\W|$)", p) and "==" not in p for p in packages)


# ---------------------------------------------------------------------- Slurm


SBATCH = INFRA / "slurm" / "avforge.sbatch"


def test_sbatch_script_syntax_and_directives() -> None:
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    lines = SBATCH.read_text().splitlines()
    assert lines[0].startswith("#!")
    first_command = next(i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#"))
    directives = [ln for ln in lines if ln.startswith("#SBATCH")]
    assert all(lines.index(d) < first_command for d in directives)  # sbatch stops reading at a command
    keys = {d.split()[1].split("=")[0] for d in directives}
    assert {"--nodes", "--ntasks-per-node", "--cpus-per-task", "--exclusive", "--time", "--signal"} <= keys
    assert SBATCH.stat().st_mode & stat.S_IXUSR


def _stub(bindir: Path, name: str, body: str) -> None:
    path = bindir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.mark.timeout(60)
def test_sbatch_starts_head_then_workers_then_avforge(tmp_path: Path) -> None:
    """Run the script with stand-ins: Ray head on node 0, workers on the rest, then the driver."""
    bindir, log = tmp_path / "bin", tmp_path / "calls.log"
    bindir.mkdir()
    _stub(bindir, "scontrol", 'printf "gpu-a\\ngpu-b\\ngpu-c\\n"\n')
    _stub(bindir, "srun", f"""
while [[ "$1" == -* ]]; do
    if [[ "$1" == -w ]]; then node="$2"; shift; fi
    shift
done
echo "srun $node $*" >> {log}
SHIM_NODE="$node" exec "$@"
""")  # fmt: skip
    _stub(bindir, "hostname", 'case "$SHIM_NODE" in gpu-a) echo "10.1.0.1 fe80::1";; *) echo 10.1.0.9;; esac\n')
    # `ray status` answers once the head has started, as the real one does
    _stub(bindir, "ray", f'[[ "$1" == status ]] && exec grep -q "^ray start --head" {log}\necho "ray $*" >> {log}\n')
    _stub(bindir, "python", f'grep -c "^ray start" {log} || true\n')  # nodes alive: the ray starts so far
    _stub(bindir, "avforge", f'printf "avforge" >> {log}; for a in "$@"; do printf " [%s]" "$a" >> {log}; done; echo >> {log}\n')
    tricky = tmp_path / "in put $(touch pwned).csv"  # input names are data, never shell code
    env = {
        "PATH": f"{bindir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "SLURM_JOB_NODELIST": "gpu-[a-c]",
        "SLURM_CPUS_PER_TASK": "32",
        "SLURM_GPUS_ON_NODE": "4",
        "AVFORGE_INPUT": str(tricky),
        "AVFORGE_OUTPUT": "/shared/out",
        "AVFORGE_CONFIG": "/shared/gpu.yaml",
        "AVFORGE_RECIPE": "howtocaption",
    }
    done = subprocess.run(["bash", str(SBATCH)], check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    head = [c for c in calls if c.startswith("srun gpu-a ray start --head")]
    assert len(head) == 1
    assert "--node-ip-address=10.1.0.1" in head[0] and "--port=6379" in head[0]
    assert "--num-cpus=32" in head[0] and "--num-gpus=4" in head[0] and "--metrics-export-port=8080" in head[0]
    workers = [c for c in calls if " ray start --address=10.1.0.1:6379" in c]
    assert sorted(c.split()[1] for c in workers) == ["gpu-b", "gpu-c"]
    driver = [c for c in calls if c.startswith("avforge")]
    expected = (f"avforge [run] [--recipe] [howtocaption] [--input] [{tricky}] [--output] [/shared/out] "
                "[--address] [10.1.0.1:6379] [--config] [/shared/gpu.yaml]")  # fmt: skip
    assert driver == [expected]
    order = [calls.index(head[0]), *(calls.index(w) for w in workers), calls.index(driver[0])]
    assert order == sorted(order) and order[0] < min(order[1:-1])
    assert "ray stop --force" in calls[-1]  # the cluster is stopped when the job ends
    assert not (tmp_path / "pwned").exists()


def test_sbatch_refuses_to_start_without_input(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "AVFORGE_OUTPUT": "/shared/out"}
    done = subprocess.run(["bash", str(SBATCH)], check=False, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "AVFORGE_INPUT" in done.stderr


# ---------------------------------------------------------------------- README


def test_infra_readme_covers_each_piece() -> None:
    text = (INFRA / "README.md").read_text()
    for heading in ("## The image", "## `ray job submit` of an `avforge run`", "## KubeRay", "## Ray cluster launcher",
                    "## Slurm", "## How GPU stages map onto GPU node types", "## Sizing a cluster from the benchmark",
                    "## Metrics for Prometheus"):  # fmt: skip
        assert heading in text
    assert "prom_metrics_service_discovery.json" in text and "--metrics-export-port" in text
    for name in ("Dockerfile", "kuberay-rayjob.yaml", "ray-cluster.yaml", "slurm/avforge.sbatch", "gpu.yaml"):
        assert (INFRA / name).exists() and f"`{name}`" in text
    assert not (INFRA / "job.yaml").exists() and not re.search(r"(?<!ray)job\.yaml", text)  # replaced by the overlay
