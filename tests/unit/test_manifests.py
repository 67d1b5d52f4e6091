"""Deployment files validate offline: KubeRay manifests against the v1.7.0 CRD schemas (with
unknown keys refused), the RayService's embedded Serve config and serve/*.yaml against Ray
Serve's own schema, and the cluster launcher YAML against the schema inside Ray."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "tests" / "data" / "kuberay-v1.7.0"


def strict(schema: dict) -> dict:
    """The CRD schema with unknown keys refused wherever properties are listed (the raw
    schemas allow anything extra; a misspelled key would pass)."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    return s


def crd_schema(kind: str) -> dict:
    with gzip.open(SCHEMAS / f"{kind}.json.gz", "rt") as f:
        return strict(json.load(f))


def manifests():
    for path in [*sorted((ROOT / "k8s").glob("*.yaml")),
                 *sorted((ROOT / "examples").rglob("*.yaml"))]:
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("apiVersion") == "ray.io/v1":
                yield pytest.param(doc, id=f"{path.name}:{doc['kind']}")


@pytest.mark.parametrize("doc", list(manifests()))
def test_kuberay_manifest_validates_against_its_crd(doc):
    jsonschema.Draft7Validator(crd_schema(doc["kind"])).validate(doc)
    if doc["kind"] == "RayService":
        from ray.serve.schema import ServeDeploySchema

        ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))


def test_every_kind_is_covered_and_a_misspelled_key_is_caught():
    kinds = {p.values[0]["kind"] for p in manifests()}
    assert kinds == {"RayCluster", "RayJob", "RayService"}
    doc = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())
    doc["spec"]["shutdownAfterJobFinish"] = True  # missing the final s
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        jsonschema.Draft7Validator(crd_schema("RayJob")).validate(doc)


def test_gpu_workers_ask_for_gpus_and_every_pod_mounts_the_runs_volume():
    doc = yaml.safe_load((ROOT / "k8s" / "raycluster.yaml").read_text())
    gpu = [g for g in doc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"][0]
    res = gpu["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    pods = [doc["spec"]["headGroupSpec"]] + doc["spec"]["workerGroupSpecs"]
    for p in pods:
        mounts = p["template"]["spec"]["containers"][0]["volumeMounts"]
        assert any(m["mountPath"] == "/mnt/runs" for m in mounts)


@pytest.mark.parametrize("path", sorted((ROOT / "serve").glob("*.yaml")), ids=lambda p: p.name)
def test_serve_configs_validate(path):
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))


def test_cluster_launcher_config_validates_against_rays_schema():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    conf = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(conf)
    gpu = conf["available_node_types"]["gpu_worker"]["resources"]
    assert gpu["GPU"] == 1
    bad = dict(conf, max_worker=3)  # misspelled top-level key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(bad)
