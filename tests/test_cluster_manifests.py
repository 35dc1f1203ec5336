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
        assert doc["spec"].get("rayVersion", doc["spec"].get("rayClusterSpec", {}).get("rayVersion")) == "2.60.0"
    else:  # Ray cluster launcher
        assert doc["head_node_type"] in doc["available_node_types"]


def test_kuberay_schema_rejects_a_broken_manifest(shared_dir):
    doc = yaml.safe_load((REPO / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, crd_schema(shared_dir, "RayCluster"))
