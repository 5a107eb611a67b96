"""A Kubernetes API for tests: kmock's KubernetesEmulator over real HTTP on loopback.

The emulator stores objects and serves list/watch/get/create/patch/delete; it does not validate against
schemas, run controllers or garbage-collect, and its lists lack `kind`. `MendedEmulator` adds what the
operator, kubectl and Helm rely on and a real API server does (each mend says so); the tests play the Job
controller and the kubelet themselves. Every request is recorded as (method, path) for the RBAC test.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml
from aiohttp import web
from kmock._internal import rendering  # the request type the emulator's hooks receive

from kubetune.crd import build_crd

# (group, version, plural) -> discovery info a real API server publishes.
RESOURCES: dict[tuple[str, str, str], dict[str, Any]] = {
    ("", "v1", "namespaces"): {"kind": "Namespace", "namespaced": False},
    ("", "v1", "configmaps"): {"kind": "ConfigMap", "namespaced": True},
    ("", "v1", "services"): {"kind": "Service", "namespaced": True, "shortnames": {"svc"}},
    ("", "v1", "pods"): {"kind": "Pod", "namespaced": True, "subresources": {"status"}, "shortnames": {"po"}},
    ("", "v1", "events"): {"kind": "Event", "namespaced": True, "shortnames": {"ev"}},
    ("", "v1", "secrets"): {"kind": "Secret", "namespaced": True},
    ("", "v1", "serviceaccounts"): {"kind": "ServiceAccount", "namespaced": True, "shortnames": {"sa"}},
    ("batch", "v1", "jobs"): {"kind": "Job", "namespaced": True, "subresources": {"status"}},
    ("apiextensions.k8s.io", "v1", "customresourcedefinitions"): {
        "kind": "CustomResourceDefinition", "namespaced": False, "shortnames": {"crd"}},
    ("kubetune.io", "v1alpha1", "finetunejobs"): {
        "kind": "FineTuneJob", "namespaced": True, "shortnames": {"ftj"}, "categories": {"all", "kubetune"},
        "subresources": {"status"}, "singular": "finetunejob"},
}
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based selectors (k=v, k!=v, k): what the operator, kubectl and these tests use."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.split("=", 1)
            if labels.get(key) != value.lstrip("="):
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _field_matches(selector: str, obj: dict[str, Any]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, _, value = term.partition("=")
        if key == "metadata.name" and obj.get("metadata", {}).get("name") != value.lstrip("="):
            return False
        if key == "metadata.namespace" and obj.get("metadata", {}).get("namespace") != value.lstrip("="):
            return False
    return True


class MendedEmulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    requests_seen: list[tuple[str, str]]
    agents_seen: list[str]  # User-Agent of each request, in the same order (benchmark: whose request)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.requests_seen = []
        self.agents_seen = []
        self._keys_by_resource: dict[Any, list[Any]] = {}
        self._indexed = 0
        for (group, version, plural), info in RESOURCES.items():
            self.resources[kmock.resource(group, version, plural)] = kmock.ResourceInfo(verbs=VERBS, **info)

    # kmock scans every stored object for every request (over 2,000 with 500 FineTuneJobs: most of the
    # emulator's time in bench/operator_scale.py). A real API server answers from an index; so do these two
    # overrides (of kmock's name-mangled private and its resource listing): a read by name is a dict lookup,
    # a list walks only its resource's objects. Stored keys are never removed (deletion marks the object).
    def _KubernetesEmulator__get_objs(self, request: rendering.Request, strict: bool) -> list[Any]:
        if request.resource is None:
            objs: list[Any] = super()._KubernetesEmulator__get_objs(request, strict)
            return objs
        stored = self._objects._objects
        resource = kmock.resource(request.resource.group, request.resource.version, request.resource.plural)
        if request.name is not None and (strict or request.namespace is not None):
            found = stored.get((resource, request.namespace, request.name))
            return [found] if found is not None else []
        return [stored[key] for key in self._keys_of(resource)
                if (key[1] == request.namespace if strict else request.namespace in (None, key[1]))
                and request.name in (None, key[2])]

    def _keys_of(self, resource: Any) -> list[Any]:
        stored = self._objects._objects
        if len(stored) != self._indexed:
            for key in itertools.islice(stored, self._indexed, None):
                self._keys_by_resource.setdefault(key[0], []).append(key)
            self._indexed = len(stored)
        return self._keys_by_resource.get(resource, [])

    def _get_resources(self) -> list[Any]:
        self._keys_of(None)  # brings the index up to date
        return list(set(kmock.KubernetesScaffold._get_resources(self)) | set(self._keys_by_resource))

    def _served(self, resource: Any) -> bool:
        return any((r.group, r.version, r.plural) == (resource.group, resource.version, resource.plural)
                   for r in self.resources)

    def _kind(self, resource: Any) -> str | None:
        info = RESOURCES.get((resource.group, resource.version, resource.plural))
        return info["kind"] if info else None

    async def _handle(self, request: rendering.Request) -> Any:
        # kmock matches each request against every request it has kept, once per reaction (quadratic: a
        # GET took 0.4 s after 600 requests, and 85% of the emulator's time with 64 kept); keep only the
        # current one, which its matching needs. requests_seen is our own log.
        del self._requests[:-1]
        self.requests_seen.append((str(request.method).split(".")[-1].upper(), request.url.path))
        self.agents_seen.append(request.headers.get("User-Agent", ""))
        if request.resource is not None and request.resource.plural and not self._served(request.resource):
            # A real API server answers 404 for a resource it does not serve (e.g. KServe not installed);
            # kmock would store anything.
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                                      "reason": "NotFound", "message": "the server could not find the requested "
                                      "resource"}, status=404)
        if request.resource is not None and isinstance(request.data, dict):
            self._mend_write(request)
        response = await super()._handle(request)
        if str(request.action).endswith("CREATE") and response.status == 200 and not response.prepared:
            response.set_status(201)  # a real API server answers a create with 201 Created
        if request.resource is not None and str(request.action).endswith("DELETE") and request.name:
            await self._collect_garbage()
        return response

    def _mend_write(self, request: rendering.Request) -> None:
        """A real API server stamps identity and bookkeeping fields; the emulator does not."""
        data, action = request.data, str(request.action)
        meta = data.setdefault("metadata", {}) if action.endswith("CREATE") else data.get("metadata")
        if action.endswith("CREATE"):
            data.setdefault("apiVersion", "/".join(filter(None, (request.resource.group, request.resource.version))))
            data.setdefault("kind", self._kind(request.resource))
            meta.setdefault("namespace", request.namespace) if request.namespace else None
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1,
                        resourceVersion=str(time.monotonic_ns()))
        elif action.endswith("UPDATE") and request.name:
            key = (request.resource, request.namespace, request.name)
            current = self.objects[key] if key in self.objects else None  # noqa: SIM401  (not a Mapping)
            if current is not None and not current.deleted:
                stored = current.raw
                bump = request.subresource is None and "spec" in data and data["spec"] != stored.get("spec")
                if request.subresource == "status":  # the status subresource ignores everything but status
                    for key_ in [k for k in data if k != "status"]:
                        del data[key_]
                elif request.subresource is None and self._kind(request.resource) == "FineTuneJob":
                    data.pop("status", None)  # ... and the main resource ignores status (CRD with /status)
                data.setdefault("metadata", {})["resourceVersion"] = str(time.monotonic_ns())
                if bump:
                    data["metadata"]["generation"] = int(stored.get("metadata", {}).get("generation", 1)) + 1

    async def _collect_garbage(self) -> None:
        """The garbage collector's job: delete what the deleted objects owned (background propagation)."""
        while True:
            alive = {obj.raw.get("metadata", {}).get("uid") for obj in self.objects.values() if not obj.deleted}
            orphans = [(key, obj) for key, obj in self.objects.items() if not obj.deleted and any(
                ref.get("uid") not in alive for ref in obj.raw.get("metadata", {}).get("ownerReferences") or [])]
            if not orphans:
                return
            async with self._lock:
                for (resource, _, _), obj in orphans:
                    raw = obj.raw
                    obj.delete()
                    await self._buses[resource].put({"type": "DELETED", "object": raw})

    async def _serve_list(self, request: rendering.Request) -> Any:
        """Lists get their kind (kubectl get/wait need it) and honour label and field selectors."""
        payload = await super()._serve_list(request)
        items = [i for i in payload["items"] if self._selected(request, i)]
        kind = self._kind(request.resource) or "Object"
        api_version = "/".join(filter(None, (request.resource.group, request.resource.version)))
        for item in items:
            item.setdefault("kind", kind)
            item.setdefault("apiVersion", api_version)
        return {"apiVersion": api_version, "kind": f"{kind}List",
                "metadata": {"resourceVersion": str(time.monotonic_ns())}, "items": items}

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[Any]:
        async for event in super()._serve_watch(request):
            if not isinstance(event, dict) or self._selected(request, event.get("object") or {}):
                yield event

    def _selected(self, request: rendering.Request, obj: dict[str, Any]) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return _selector_matches(request.params.get("labelSelector", ""), labels) and \
            _field_matches(request.params.get("fieldSelector", ""), obj)


class Cluster:
    """The emulator served over HTTP from a background thread, with a kubeconfig pointing at it."""
    emulator_type: type[MendedEmulator] = MendedEmulator  # a subclass may mend more (Helm)

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.kubeconfig = workdir / "kubeconfig"
        self.emulator: MendedEmulator | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, name="kmock", daemon=True)
        self.url = ""

    def _serve(self) -> None:
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # one line per request drowns test output
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with self.emulator_type() as emulator, kmock.Server(emulator) as server:
            self.emulator = emulator
            self.url = f"http://{server.host}:{server.port}"
            self._ready.set()
            await self._stop.wait()

    def start(self) -> Cluster:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the Kubernetes emulator did not start")
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": "test-token"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test", "namespace": "default"}}],
        }))
        self.call(self._register)
        return self

    async def _register(self) -> None:
        assert self.emulator is not None
        crd = build_crd()
        self.emulator.objects["apiextensions.k8s.io/v1/customresourcedefinitions", None, crd["metadata"]["name"]] = {
            **crd, "metadata": {**crd["metadata"], "uid": str(uuid.uuid4()), "creationTimestamp": _now()}}
        for namespace in ("default", "ml"):
            self.emulator.objects["v1/namespaces", None, namespace] = {
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "uid": str(uuid.uuid4())}}

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run a coroutine function on the emulator's loop (for direct, test-side inspection)."""
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(30)

    def requests(self) -> list[tuple[str, str]]:
        assert self.emulator is not None
        return list(self.emulator.requests_seen)

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture(scope="module")
def k8s_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("k8s")).start()
    yield cluster
    cluster.stop()
