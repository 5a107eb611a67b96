"""The pod settings a platform team needs (issue 26, items 13-18): private registries, where pre-flight pods run,
QoS and sized volumes, a grace period that fits the checkpoint, writable paths for any image, NetworkPolicy and
Istio.

Builder properties are checked on the dicts the builders return; the real API server (tests/control_plane.py) shows
what it accepts and computes from them (the QoS class, the env a pod got, a pre-flight on tainted nodes, the
NetworkPolicy's selectors against the pods that run); the chart is rendered with the real helm.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import kubernetes_validate
import pytest
import yaml

from kubetune import contract
from kubetune.cli import main
from kubetune.footprint import UPLOAD_BYTES_PER_SECOND, Footprint, of_plan
from kubetune.jobfile import job_document, write_job
from kubetune.memory import plan
from kubetune.spec import FineTuneJob
from kubetune.train.interrupts import WORKER_SHARE
from kubetune_operator import builders
from kubetune_operator.settings import Settings
from tests.cluster import CHART, RELEASE_NAMESPACE, ROOT, KubeCluster
from tests.fixtures_models import classification_job
from tests.operator_harness import NS, OPERATOR_SELECTOR, Api, ChartOperator, wait_for
from tests.scripted_trainer import ScriptedTrainer
from tests.test_chart import find, helm, render
from tests.test_memory_estimate import LLAMA_7B
from tests.test_operator import BASE as OPERATOR_BASE

BASE = {**OPERATOR_BASE, "resources": {"nodes": 1, "gpusPerNode": 0, "cpu": "1", "memory": "1Gi"}}
IMAGE = "ghcr.io/kubetune/trainer:0.1.0"
GPU_TAINT = {"key": "kubetune.io/gpu", "operator": "Exists", "effect": "NoSchedule"}
CHART_SETTINGS = dict(image_pull_secrets=("chart-registry",), preflight_image="ghcr.io/kubetune/trainer:0.1.0-cpu",
                      preflight_node_selector={"kubetune.io/pool": "cpu"},
                      preflight_tolerations=[{"key": "cpu-only", "operator": "Exists"}])


def ftj(**spec: Any) -> dict[str, Any]:
    doc = job_document("pods", BASE, spec)
    doc["metadata"].update(namespace=NS, uid="0b9e1a52-0000-4000-8000-000000000026")
    return doc


def trainer_pod(doc: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    pod: dict[str, Any] = builders.build_job(doc, image=IMAGE, service_account="sa", **kwargs)["spec"]["template"]
    return pod


def preflight_pod(doc: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    pod: dict[str, Any] = builders.build_preflight_job(doc, image=IMAGE, service_account="sa", **kwargs)[
        "spec"]["template"]
    return pod


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]}


def volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(v for v in pod["spec"]["volumes"] if v["name"] == name)
    return found


def refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], **spec: Any) -> str:
    """What `kubetune validate` says about a job with these fields; it must exit 2."""
    path = write_job(job_document("bad", BASE, spec), tmp_path / "bad.yaml")
    assert main(["validate", str(path)]) == contract.EXIT_BAD_INPUT
    return capsys.readouterr().err


# ---- 13: private registries --------------------------------------------------------------------------------
def test_pull_secrets_of_the_chart_and_the_job_reach_trainer_and_preflight_pods() -> None:
    doc = ftj(imagePullSecrets=["team-registry", "chart-registry"])
    chart = Settings(**CHART_SETTINGS)  # type: ignore[arg-type]
    for pod in (trainer_pod(doc, settings=chart), preflight_pod(doc, settings=chart)):
        assert pod["spec"]["imagePullSecrets"] == [{"name": "chart-registry"}, {"name": "team-registry"}]
    for pod in (trainer_pod(ftj()), preflight_pod(ftj())):
        assert "imagePullSecrets" not in pod["spec"]


def test_a_pull_secret_must_be_a_secret_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "spec.imagePullSecrets[0]: 'Team_Registry' is not a DNS subdomain" in refused(
        tmp_path, capsys, imagePullSecrets=["Team_Registry"])


# ---- 14: pre-flight pods that can be steered ---------------------------------------------------------------
def test_preflight_runs_where_the_job_may_run() -> None:
    doc = ftj(resources={"nodeSelector": {"kubetune.io/pool": "gpu"}, "tolerations": [GPU_TAINT],
                         "priorityClassName": "team-batch"}, runPolicy={"queueName": "team-a"})
    job = builders.build_preflight_job(doc, image=IMAGE, service_account="sa")
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubetune.io/pool": "gpu"} and pod["tolerations"] == [GPU_TAINT]
    assert pod["priorityClassName"] == "team-batch"
    # Kueue admits it from the job's queue, as it does the trainers (and counts its quota there).
    assert job["metadata"]["labels"][contract.LABEL_QUEUE] == "team-a" and job["spec"]["suspend"] is True
    assert builders.build_preflight_job(ftj(), image=IMAGE, service_account="sa")["spec"]["suspend"] is False


def test_the_chart_can_send_preflights_to_a_cpu_pool_with_a_smaller_image() -> None:
    chart = Settings(**CHART_SETTINGS)  # type: ignore[arg-type]
    pod = preflight_pod(ftj(resources={"nodeSelector": {"kubetune.io/pool": "gpu"}, "tolerations": [GPU_TAINT]}),
                        settings=chart)["spec"]
    assert pod["nodeSelector"] == {"kubetune.io/pool": "cpu"}
    assert pod["tolerations"] == [{"key": "cpu-only", "operator": "Exists"}]
    assert pod["containers"][0]["image"] == "ghcr.io/kubetune/trainer:0.1.0-cpu"
    # A job's own image is what it will train with: its pre-flight checks the model with that one.
    assert preflight_pod(ftj(image="registry.example.com/mine:2"), settings=chart)["spec"]["containers"][0][
        "image"] == "registry.example.com/mine:2"


def test_preflight_footprint_is_small_and_bounded() -> None:
    pod = preflight_pod(ftj())["spec"]
    resources = pod["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in str(resources) and resources["requests"]["ephemeral-storage"]
    assert volume({"spec": pod}, "work")["emptyDir"]["sizeLimit"] == builders.PREFLIGHT_DISK
    # The deadline covers a cold pull of a multi-GB trainer image on a CPU node, not only the checks.
    assert builders.PREFLIGHT_DEADLINE_SECONDS >= 1800


# ---- 15: QoS, threads, /dev/shm and the work volume --------------------------------------------------------
def test_burstable_by_default_guaranteed_on_request() -> None:
    default = trainer_pod(ftj(resources={"cpu": "4", "memory": "8Gi"}))["spec"]["containers"][0]["resources"]
    assert "cpu" not in default["limits"]
    guaranteed = trainer_pod(ftj(resources={"cpu": "4", "memory": "8Gi", "gpusPerNode": 2, "guaranteed": True}))
    resources = guaranteed["spec"]["containers"][0]["resources"]
    assert resources["limits"] == resources["requests"] == {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": 2}


@pytest.mark.parametrize(("cpu", "gpus", "threads"), [("8", 8, "1"), ("32", 8, "4"), ("2500m", 0, "3"),
                                                      ("500m", 0, "1")])
def test_threads_follow_the_cpu_request_not_the_nodes_cores(cpu: str, gpus: int, threads: str) -> None:
    """Without a cpu limit there is no cgroup quota to read, and torch would start a thread per core of the node."""
    pod = trainer_pod(ftj(resources={"cpu": cpu, "gpusPerNode": gpus, "memory": "64Gi"}))
    assert env_of(pod)[contract.ENV_OMP_THREADS] == threads


def test_shm_is_sized_inside_the_memory() -> None:
    assert volume(trainer_pod(ftj(resources={"memory": "4Gi"})), "dshm")["emptyDir"] == {
        "medium": "Memory", "sizeLimit": "1024Mi"}
    assert volume(trainer_pod(ftj(resources={"memory": "4Gi", "shmSize": "2Gi"})), "dshm")["emptyDir"][
        "sizeLimit"] == "2Gi"


def test_shm_must_leave_the_trainer_memory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "spec.resources.shmSize: 1Gi is not below resources.memory 1Gi" in refused(
        tmp_path, capsys, resources={"shmSize": "1Gi"})


def test_work_volume_sized_from_the_job_or_the_preflights_estimate() -> None:
    sized = trainer_pod(ftj(resources={"ephemeralStorage": "200Gi"}))
    assert volume(sized, "work")["emptyDir"] == {"sizeLimit": "200Gi"}
    assert sized["spec"]["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "200Gi"
    # An estimate only asks the scheduler for that much disk: a size limit set too low would evict the pod.
    estimated = trainer_pod(ftj(), footprint=Footprint(model_bytes=16 * 2**30, checkpoint_bytes=2**30))
    assert estimated["spec"]["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "44Gi"
    assert volume(estimated, "work")["emptyDir"] == {}
    assert "ephemeral-storage" not in trainer_pod(ftj())["spec"]["containers"][0]["resources"]["requests"]


def test_free_restarts_are_capped_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = builders.resolved_job(ftj()).spec.run_policy
    assert policy.max_free_restarts == 20
    assert builders.resolved_job(ftj(runPolicy={"maxFreeRestarts": None})).spec.run_policy.max_free_restarts is None
    assert "spec.runPolicy.maxFreeRestarts: Input should be greater than or equal to 0" in refused(
        tmp_path, capsys, runPolicy={"maxFreeRestarts": -1})


# ---- 16: the grace period ----------------------------------------------------------------------------------
def grace(pod: dict[str, Any]) -> tuple[int, int]:
    """The pod's grace period and the trainer's own budget (KUBETUNE_GRACE_SECONDS)."""
    return pod["spec"]["terminationGracePeriodSeconds"], int(env_of(pod)[contract.ENV_GRACE_SECONDS])


def test_grace_period_from_the_spec_keeps_the_trainer_in_step() -> None:
    assert grace(trainer_pod(ftj(runPolicy={"terminationGracePeriodSeconds": 600}))) == (
        600, 600 - contract.GRACE_MARGIN_SECONDS)
    assert grace(trainer_pod(ftj())) == (contract.DEFAULT_GRACE_SECONDS + contract.GRACE_MARGIN_SECONDS,
                                         contract.DEFAULT_GRACE_SECONDS)


def test_a_full_fine_tunes_checkpoint_fits_in_the_default_grace_period() -> None:
    """Llama-7B, full, on 2 pods x 8 GPUs (fsdp): each pod uploads its 8 ranks' shards of weights, AdamW's moments
    and the best copy, 16 bytes a parameter over 2 pods: about 54 GB, 540 s at the assumed 100 MB/s."""
    doc = ftj(model={"uri": "s3://models/llama/", "task": "causal-lm", "labels": None},
              method={"type": "full"}, resources={"nodes": 2, "gpusPerNode": 8, "cpu": "64", "memory": "512Gi"})
    spec = builders.resolved_job(doc).spec
    memory = plan(spec, world_size=16, device_bytes=80 * 2**30, config=LLAMA_7B)
    footprint = of_plan(spec, memory, LLAMA_7B)
    assert memory.strategy == "fsdp" and footprint.checkpoint_bytes == memory.trainable * 16 // 2
    pod_grace, trainer_budget = grace(trainer_pod(doc, footprint=footprint))
    upload = footprint.checkpoint_bytes / UPLOAD_BYTES_PER_SECOND
    assert trainer_budget * WORKER_SHARE >= upload + contract.DEFAULT_GRACE_SECONDS  # workers stop at 80%
    assert pod_grace == trainer_budget + contract.GRACE_MARGIN_SECONDS
    assert 11 * 60 <= pod_grace <= 13 * 60  # the user guide's "about 12 minutes"; it was 45 s


def test_a_grace_period_too_short_for_the_margin_is_refused(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert "spec.runPolicy.terminationGracePeriodSeconds: Input should be greater than or equal to 20" in refused(
        tmp_path, capsys, runPolicy={"terminationGracePeriodSeconds": 10})


def test_the_preflight_leaves_its_estimate_for_the_operator(tmp_path: Path, minilm_path: Path,
                                                            reviews_subset: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`kubetune validate --deep` in a pre-flight pod writes the footprint to its termination log; the operator
    reads it from the pod's status (preflight_footprint) and sizes the trainer pods from it."""
    doc = classification_job("deep", minilm_path, reviews_subset, tmp_path / "out", method={"type": "full"},
                             resources={"gpusPerNode": 0, "memory": "4Gi"})
    path = write_job(doc, tmp_path / "job.yaml")
    log = tmp_path / "termination-log"
    monkeypatch.setenv(contract.ENV_TERMINATION_LOG, str(log))
    assert main(["validate", "--deep", str(path)]) == contract.EXIT_OK, capsys.readouterr().err
    pod = {"status": {"containerStatuses": [{"state": {"terminated": {"exitCode": 0, "message": log.read_text()}}}]}}
    footprint = builders.preflight_footprint([pod])
    job = FineTuneJob.model_validate(doc)
    config = json.loads((minilm_path / "config.json").read_text())
    memory = plan(job.spec, world_size=1, device_bytes=None, config=config)
    assert footprint == Footprint(model_bytes=memory.parameters * 4, checkpoint_bytes=memory.trainable * 16)
    assert builders.preflight_footprint([{"status": {}}]) is None


# ---- 17: writable home, caches and temporary files for any image -------------------------------------------
@pytest.mark.parametrize("image", [None, "registry.example.com/team/custom:1"])
def test_home_caches_and_tmp_are_on_writable_volumes(image: str | None) -> None:
    doc = ftj(image=image) if image else ftj()
    for pod in (trainer_pod(doc), preflight_pod(doc)):
        container = pod["spec"]["containers"][0]
        writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")
                    and "emptyDir" in volume(pod, m["name"])}
        env = env_of(pod)
        for name in (contract.ENV_HOME, contract.ENV_HF_HOME, contract.ENV_TMPDIR):
            assert any(env[name] == path or env[name].startswith(path + "/") for path in writable), (name, env[name])
        assert contract.TMP_DIR in writable  # code that ignores TMPDIR writes to /tmp


# ---- 18: Istio and the NetworkPolicy -----------------------------------------------------------------------
def test_no_istio_sidecar_on_trainer_and_preflight_pods() -> None:
    for pod in (trainer_pod(ftj()), preflight_pod(ftj())):
        assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
        assert pod["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"


def network_policies(tmp_path: Path, values: dict[str, Any] | None = None, release: str = "t"
                     ) -> list[dict[str, Any]]:
    return find(render(tmp_path, {"serviceAccount.trainer.namespaces": [NS], **(values or {})}, release=release),
                "NetworkPolicy")


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels, matchExpressions with In) against a pod's labels."""
    expressions = selector.get("matchExpressions") or []
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items()) and all(
        labels.get(e["key"]) in e["values"] for e in expressions if e["operator"] == "In")


def test_network_policy_is_off_by_default_and_lets_the_scrape_and_the_gang_through(tmp_path: Path) -> None:
    assert network_policies(tmp_path) == []
    policies = network_policies(tmp_path, {"networkPolicy.enabled": True})
    assert {p["metadata"]["namespace"] for p in policies} == {RELEASE_NAMESPACE, NS}
    for policy in policies:
        kubernetes_validate.validate(policy, "1.33.0", strict=True)
    policy = next(p for p in policies if p["metadata"]["namespace"] == NS)["spec"]
    assert policy["policyTypes"] == ["Ingress"]  # egress stays as the cluster has it unless asked
    trainer = trainer_pod(ftj())["metadata"]["labels"]
    assert selects(policy["podSelector"], trainer) and not selects(policy["podSelector"], preflight_pod(ftj())[
        "metadata"]["labels"])
    scrape, gang = policy["ingress"]
    deployment = find(render(tmp_path, {}), "Deployment")[0]["spec"]["template"]["metadata"]["labels"]
    (operator,) = scrape["from"]
    assert operator["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": RELEASE_NAMESPACE}
    assert selects(operator["podSelector"], deployment) and scrape["ports"] == [
        {"port": contract.DEFAULT_METRICS_PORT, "protocol": "TCP"}]
    assert "ports" not in gang and selects(gang["from"][0]["podSelector"], trainer)  # NCCL's ports are not fixed


def test_network_policy_egress_and_more_scrapers_on_request(tmp_path: Path) -> None:
    storage = {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 9000, "protocol": "TCP"}]}
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    policies = network_policies(tmp_path, {"networkPolicy.enabled": True, "networkPolicy.egress.enabled": True,
                                           "networkPolicy.egress.rules": [storage],
                                           "networkPolicy.metricsFrom": [prometheus]})
    ingress = next(p for p in policies if p["metadata"]["name"].endswith("-trainers"))["spec"]["ingress"][0]
    assert ingress["from"][1] == prometheus
    egress = next(p for p in policies if p["metadata"]["name"].endswith("-job-egress"))["spec"]
    assert egress["policyTypes"] == ["Egress"]
    assert all(selects(egress["podSelector"], pod["metadata"]["labels"])
               for pod in (trainer_pod(ftj()), preflight_pod(ftj())))
    dns, peers, extra = egress["egress"]
    assert {p["port"] for p in dns["ports"]} == {53} and extra == storage
    assert selects(peers["to"][0]["podSelector"], trainer_pod(ftj())["metadata"]["labels"])


def test_chart_values_reach_the_builders_through_the_operators_env(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"jobPods.imagePullSecrets": ["chart-registry"], "jobPods.preflight.image": "reg.local/trainer:cpu",
              "jobPods.preflight.nodeSelector": {"kubetune.io/pool": "cpu"},
              "jobPods.preflight.tolerations": [{"key": "cpu-only", "operator": "Exists"}]}
    container = find(render(tmp_path, values), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    for item in container["env"]:
        if "value" in item:
            monkeypatch.setenv(item["name"], item["value"])
    chart = Settings()
    pod = preflight_pod(ftj(), settings=chart)["spec"]
    assert pod["imagePullSecrets"] == [{"name": "chart-registry"}] and pod["containers"][0]["image"] == \
        "reg.local/trainer:cpu"
    assert pod["nodeSelector"] == {"kubetune.io/pool": "cpu"} and pod["tolerations"] == [
        {"key": "cpu-only", "operator": "Exists"}]
    for name in ("KUBETUNE_PREFLIGHT_NODE_SELECTOR", "KUBETUNE_PREFLIGHT_TOLERATIONS"):  # the chart's empty {} / []
        monkeypatch.setenv(name, json.dumps({} if "SELECTOR" in name else []))
    assert "nodeSelector" not in preflight_pod(ftj(), settings=Settings())["spec"]


def test_the_user_guides_platform_values_render(tmp_path: Path) -> None:
    guide = (ROOT / "docs" / "user-guide.md").read_text()
    block = re.search(r"```yaml\n# values-platform.yaml\n(.*?)```", guide, re.S)
    assert block, "docs/user-guide.md: no `# values-platform.yaml` block"
    values = tmp_path / "values-platform.yaml"
    values.write_text(block.group(1))
    done = helm("template", "kubetune", str(CHART), "-n", RELEASE_NAMESPACE, "-f", str(values))
    assert done.returncode == 0, done.stderr
    objects = [o for o in yaml.safe_load_all(done.stdout) if o]
    assert {p["metadata"]["namespace"] for p in find(objects, "NetworkPolicy")} == {RELEASE_NAMESPACE, "team-a",
                                                                                   "team-b"}


# ---- on the real control plane -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def operator_values() -> dict[str, Any]:
    return {"operator": {"preflight": True}, "jobPods": {"imagePullSecrets": ["chart-registry"]}}


def submit(api: Api, name: str, **spec: Any) -> None:
    doc = job_document(name, BASE, spec)
    doc["metadata"]["namespace"] = NS
    api.apply(doc)


def finish(api: Api, trainer: ScriptedTrainer, operator: ChartOperator, name: str) -> None:
    trainer.exit(f"{name}-0-0", 0, {"outcome": "Succeeded", "exitCode": 0})
    wait_for("Succeeded", lambda: api.status(name).get("phase") == "Succeeded", operator=operator)
    api.delete_ftj(name)
    wait_for(f"{name}'s pods gone", lambda: not api.core.list_namespaced_pod(
        NS, label_selector=f"{contract.LABEL_JOB_NAME}={name}").items, timeout=60)


def test_the_api_server_takes_the_pod_settings_and_computes_guaranteed_qos(
        api: Api, operator: ChartOperator, trainer: ScriptedTrainer) -> None:
    submit(api, "qos", image="kubetune-test/scripted-trainer:custom", imagePullSecrets=["team-registry"],
           resources={"guaranteed": True, "shmSize": "128Mi", "ephemeralStorage": "2Gi"},
           runPolicy={"terminationGracePeriodSeconds": 120})
    seen = wait_for("the trainer pod", lambda: trainer.started("qos-0-0"), timeout=90, operator=operator)
    (pod,) = api.pods("qos-0")
    assert pod["status"]["qosClass"] == "Guaranteed"  # computed by the API server from requests and limits
    assert {"name": "team-registry"} in pod["spec"]["imagePullSecrets"]
    assert pod["spec"]["terminationGracePeriodSeconds"] == 120
    assert volume(pod, "dshm")["emptyDir"]["sizeLimit"] == "128Mi"
    assert volume(pod, "work")["emptyDir"]["sizeLimit"] == "2Gi"
    assert pod["spec"]["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "2Gi"
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    env = seen["env"]  # what the process got; the node agent maps volume paths to its folders
    assert env[contract.ENV_GRACE_SECONDS] == str(120 - contract.GRACE_MARGIN_SECONDS)
    assert env[contract.ENV_OMP_THREADS] == "1"
    work = env[contract.ENV_WORK_DIR]
    assert env[contract.ENV_HOME] == work and env[contract.ENV_HF_HOME].startswith(work + "/")
    assert env[contract.ENV_TMPDIR] == work + "/tmp"
    (preflight,) = api.pods("qos-preflight")
    assert {"name": "team-registry"} in preflight["spec"]["imagePullSecrets"]
    assert preflight["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    finish(api, trainer, operator, "qos")


@pytest.fixture
def tainted_nodes(kube: KubeCluster) -> Iterator[None]:
    """Every node a GPU node, tainted: only pods that tolerate it schedule."""
    nodes = [n["metadata"]["name"] for n in kube.get("nodes")["items"]]
    for node in nodes:
        kube.run("kubectl", "taint", "nodes", node, "kubetune.io/gpu=true:NoSchedule")
    scheduling = kubernetes.client.SchedulingV1Api(kube.client())
    scheduling.create_priority_class({"metadata": {"name": "team-batch"}, "value": 1000})
    try:
        yield
    finally:
        for node in nodes:
            kube.run("kubectl", "taint", "nodes", node, "kubetune.io/gpu=true:NoSchedule-")
        scheduling.delete_priority_class("team-batch")


def test_a_preflight_runs_on_tainted_gpu_nodes_with_the_jobs_scheduling(
        api: Api, operator: ChartOperator, trainer: ScriptedTrainer, tainted_nodes: None) -> None:
    submit(api, "tainted", resources={"tolerations": [GPU_TAINT], "nodeSelector": {"kubetune.io/pool": "gpu"},
                                      "priorityClassName": "team-batch"})
    wait_for("the pre-flight ran", lambda: trainer.ended("tainted-preflight"), timeout=90, operator=operator)
    (preflight,) = api.pods("tainted-preflight")
    assert preflight["spec"]["nodeName"] == "gpu-node" and preflight["spec"]["priority"] == 1000
    wait_for("the trainer pod", lambda: trainer.started("tainted-0-0"), timeout=90, operator=operator)
    finish(api, trainer, operator, "tainted")


def test_the_network_policy_selects_the_pods_that_run(kube: KubeCluster, api: Api, operator: ChartOperator,
                                                      trainer: ScriptedTrainer, tmp_path: Path) -> None:
    """The API server takes the policies, and their selectors pick the running trainer and operator pods."""
    policies = network_policies(tmp_path, {"networkPolicy.enabled": True, "networkPolicy.egress.enabled": True},
                                release="kubetune")
    done = kube.run("kubectl", "apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(policies))
    assert done.stdout.count("networkpolicy.networking.k8s.io/") == len(policies), done.stdout
    submit(api, "netpol")
    wait_for("the trainer pod", lambda: trainer.started("netpol-0-0"), timeout=90, operator=operator)
    policy = next(p for p in policies if p["metadata"]["namespace"] == NS and p["spec"]["policyTypes"] == [
        "Ingress"])["spec"]

    def pods(namespace: str, selector: dict[str, Any]) -> set[str]:
        text = ",".join(f"{k}={v}" for k, v in selector["matchLabels"].items())
        found = api.core.list_namespaced_pod(namespace, label_selector=text).items
        return {p.metadata.name for p in found}

    assert {p["metadata"]["name"] for p in api.pods("netpol-0")} <= pods(NS, policy["podSelector"])
    operator_peer = policy["ingress"][0]["from"][0]
    assert {p["metadata"]["name"] for p in operator.pods()} == pods(
        operator_peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], operator_peer["podSelector"])
    assert OPERATOR_SELECTOR.split("=")[1] == operator_peer["podSelector"]["matchLabels"][
        "app.kubernetes.io/component"]
    finish(api, trainer, operator, "netpol")


def test_the_charts_pull_secrets_reach_every_pod(api: Api, operator: ChartOperator, trainer: ScriptedTrainer) -> None:
    submit(api, "registry")
    wait_for("the trainer pod", lambda: trainer.started("registry-0-0"), timeout=90, operator=operator)
    try:
        for pod in (*api.pods("registry-preflight"), *api.pods("registry-0")):
            assert {"name": "chart-registry"} in pod["spec"].get("imagePullSecrets", [])
    finally:
        finish(api, trainer, operator, "registry")


def test_the_grace_period_follows_the_preflights_estimate(api: Api, operator: ChartOperator,
                                                          trainer: ScriptedTrainer) -> None:
    footprint = Footprint(model_bytes=2 * 10**9, checkpoint_bytes=20 * 10**9)  # its disk fits the test nodes
    trainer.exit("estimated-preflight", 0, {"footprint": footprint.to_json()})
    submit(api, "estimated")
    seen = wait_for("the trainer pod", lambda: trainer.started("estimated-0-0"), timeout=90, operator=operator)
    try:
        (pod,) = api.pods("estimated-0")
        assert pod["spec"]["terminationGracePeriodSeconds"] == \
            footprint.trainer_grace_seconds() + contract.GRACE_MARGIN_SECONDS
        assert seen["env"][contract.ENV_GRACE_SECONDS] == str(footprint.trainer_grace_seconds())
        assert pod["spec"]["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "51Gi"
    finally:
        finish(api, trainer, operator, "estimated")
