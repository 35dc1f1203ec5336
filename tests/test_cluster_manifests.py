"""Every deployment file in cluster/ parses, and the KubeRay manifests validate against KubeRay's own CRD schemas."""
from __future__ import annotations

import functools
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((REPO / "cluster").rglob("*.yaml"))


@functools.cache
def crd_schema(shared_dir: Path, kind: str) -> dict:
    crd = yaml.load((shared_dir / "schemas" / "kuberay" / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=yaml.CSafeLoader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(REPO)))
def test_manifest_is_valid(path, shared_dir):
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict) and doc, f"{path} is empty"
    if doc.get("apiVersion", "").startswith("ray.io/"):
        jsonschema.validate(doc, crd_schema(shared_dir, doc["kind"]))
        cluster = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or {}  # RayJob / RayService
        assert doc["spec"].get("rayVersion", cluster.get("rayVersion")) == "2.60.0"
    elif doc.get("kind") == "List":  # plain Kubernetes objects (no CRD schema here): names and references agree
        items = {(item["kind"], item["metadata"]["name"]): item for item in doc["items"]}
        assert len(items) == len(doc["items"]) and all(item.get("apiVersion") for item in doc["items"])
        for (kind, name), item in items.items():
            if kind == "Deployment":
                labels = item["spec"]["template"]["metadata"]["labels"]
                assert item["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
                for volume in item["spec"]["template"]["spec"].get("volumes", []):
                    claim = volume.get("persistentVolumeClaim", {}).get("claimName")
                    assert claim is None or ("PersistentVolumeClaim", claim) in items, claim
            if kind == "Service":
                assert any(other["kind"] == "Deployment" and item["spec"]["selector"].items()
                           <= other["spec"]["template"]["metadata"]["labels"].items() for other in doc["items"]), name
    else:  # Ray cluster launcher
        assert doc["head_node_type"] in doc["available_node_types"]


def test_kuberay_schema_rejects_a_broken_manifest(shared_dir):
    doc = yaml.safe_load((REPO / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, crd_schema(shared_dir, "RayCluster"))


def test_train_rayjob_runs_vita_audio_train_on_all_its_gpus():
    """The training RayJob's entrypoint parses with `vita-audio train`'s own flags, names a recipe that loads,
    and asks for exactly the GPUs its worker group has (one DeepSpeed rank per GPU)."""
    import argparse
    import shlex

    from cli import train as cmd_train
    from jobs.train.run import load_recipe

    doc = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayjob-train.yaml").read_text())
    words = shlex.split(doc["spec"]["entrypoint"])
    assert words[:2] == ["vita-audio", "train"]
    parser = argparse.ArgumentParser()
    cmd_train.add_arguments(parser, "train")
    args = parser.parse_args(words[2:])
    assert sorted(load_recipe(str(REPO / args.recipe))) == [1, 2, 3, 4] and args.stages == "1-4"
    gpus = sum(g["replicas"] * g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
               for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert args.workers * args.gpus_per_worker == gpus and args.out.is_absolute()


def test_rayservice_schema_rejects_a_broken_upgrade_strategy(shared_dir):
    doc = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    doc["spec"]["upgradeStrategy"] = {"type": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": {}}
    with pytest.raises(jsonschema.ValidationError):  # incremental upgrades need gatewayClassName, step, interval
        jsonschema.validate(doc, crd_schema(shared_dir, "RayService"))


def test_prepare_rayjob_runs_vita_audio_prepare_on_its_gpus():
    """The preparation RayJob's entrypoint parses with `vita-audio prepare`'s own flags (sources with absolute
    paths and known kinds), and its encoder actors fit the GPUs of its worker group."""
    import argparse
    import shlex

    from cli import prepare as cmd_prepare

    doc = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayjob-prepare.yaml").read_text())
    words = shlex.split(doc["spec"]["entrypoint"])
    assert words[:2] == ["vita-audio", "prepare"]
    parser = argparse.ArgumentParser()
    cmd_prepare.add_arguments(parser, "prepare")
    args = parser.parse_args(words[2:])
    for source in args.source:
        kind, _, path = source.partition(":")
        assert kind in cmd_prepare.KINDS and path.startswith("/data/")
    gpus = sum(g["replicas"] * g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
               for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert 0 < args.encoder_actors * args.gpus_per_actor <= gpus and Path(args.out).is_absolute() and args.address == "auto"


def test_rayservice_keeps_gcs_and_the_state_store_in_one_redis(shared_dir):
    """GCS fault tolerance and the endpoint's state store use the same Redis (the Service of redis.yaml), the
    state store in its own database; every pod points the config's `state: null` at it; the ingress autoscales."""
    from urllib.parse import urlsplit

    from serve.app import Args

    doc = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    cluster = doc["spec"]["rayClusterConfig"]
    gcs = cluster["gcsFaultToleranceOptions"]
    host, port = gcs["redisAddress"].rsplit(":", 1)
    redis = yaml.safe_load((REPO / "cluster" / "kuberay" / "redis.yaml").read_text())
    service = next(i for i in redis["items"] if i["kind"] == "Service")
    assert service["metadata"]["name"] == host and int(port) in [p["port"] for p in service["spec"]["ports"]]
    secret = gcs["redisPassword"]["valueFrom"]["secretKeyRef"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for pod in pods:
        env = {e["name"]: e for e in pod["template"]["spec"]["containers"][0]["env"]}
        assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret
        names = list(env)  # Kubernetes expands $(REDIS_PASSWORD) only from a variable defined before it
        assert names.index("REDIS_PASSWORD") < names.index("VITA_AUDIO_STATE")
        url = urlsplit(env["VITA_AUDIO_STATE"]["value"])
        assert url.scheme == "redis" and (url.hostname, url.port) == (host, int(port))
        assert url.password == "$(REDIS_PASSWORD)" and url.path == "/1"  # database 0 is the GCS'
    args = Args.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"])
    assert args.state is None  # so $VITA_AUDIO_STATE decides
    assert args.ingress.max_replicas > args.ingress.min_replicas >= 1
