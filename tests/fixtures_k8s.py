"""A Kubernetes API for tests: kmock's KubernetesEmulator over real HTTP on loopback.

The emulator stores objects and serves list/watch/get/create/patch/delete; it does not validate against
schemas, run controllers or garbage-collect, and its lists lack `kind`. `MendedEmulator` adds what the
operator, kubectl and Helm rely on and a real API server does (each mend says so: identity fields, 201 on
create, 404 for unserved resources, status subresources, garbage collection, list kinds and selectors,
server-side Tables for `kubectl get`, JSON watch streams that start at the requested resourceVersion,
`watch=True` as a watch, `/api/v1/namespaces` paths); the tests play the Job controller and the kubelet
themselves, and `make cluster` (tests/devcluster.py) serves this same emulator. Every request is recorded
as (method, path) for the RBAC test.
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
from kmock._internal import parsing, rendering  # the request type the emulator's hooks receive

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


_kmock_parse_path = parsing.parse_path


def _parse_path(path: str) -> Any:
    """kmock reads `/api/v1/namespaces[/NAME]` as a namespace prefix with nothing after it (a 500 error): the
    Namespace resource itself, which kopf lists and watches in namespaced mode (KUBETUNE_NAMESPACES)."""
    parts = path.strip("/").split("/")
    if parts[:2] == ["api", "v1"] and parts[2:3] == ["namespaces"] and len(parts) <= 4:
        return parsing.ParsedPath("", "v1", "namespaces", None, parts[3] if len(parts) == 4 else None, None)
    return _kmock_parse_path(path)


parsing.parse_path = _parse_path  # module-wide: kmock's request parser looks it up there on each request

_kmock_guess_k8s = parsing.guess_k8s
_GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}  # what the API server's boolean query parameters accept


def _guess_k8s(k8s: Any, method: Any, query: dict[str, str]) -> Any:
    """kmock takes a GET as a watch only for `watch=true`; the Python client sends `watch=True`, which the
    API server (Go's ParseBool) reads as true too, and kmock answered as a plain list."""
    if query.get("watch") in _GO_TRUE:
        query = {**query, "watch": "true"}
    return _kmock_guess_k8s(k8s, method, query)


parsing.guess_k8s = _guess_k8s


# Server-side printing: kubectl get asks for a Table and shows its columns (a CRD's additionalPrinterColumns).
PRINTER_COLUMNS = {"FineTuneJob": build_crd()["spec"]["versions"][0]["additionalPrinterColumns"]}
AGE_ONLY = [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]


def _wants_table(request: rendering.Request) -> bool:
    return "as=Table" in request.headers.get("Accept", "")


def _table(kind: str | None, objects: list[dict[str, Any]]) -> dict[str, Any]:
    """A meta.k8s.io/v1 Table as the API server renders one: Name, the printer columns, dates as ages."""
    columns = PRINTER_COLUMNS.get(kind or "", AGE_ONLY)
    definitions = [{"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}] + [
        {"name": c["name"], "type": c["type"], "format": "", "description": c.get("description", ""),
         "priority": c.get("priority", 0)} for c in columns]
    rows = [{"cells": [o["metadata"]["name"], *(_cell(o, c) for c in columns)], "object": o} for o in objects]
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": str(time.monotonic_ns())},
            "columnDefinitions": definitions, "rows": rows}


def _cell(obj: dict[str, Any], column: dict[str, Any]) -> Any:
    value: Any = obj
    for key in column["jsonPath"].lstrip(".").split("."):
        value = value.get(key) if isinstance(value, dict) else None
    if value is None or column["type"] != "date":
        return value
    seconds = int((datetime.datetime.now(datetime.UTC) - datetime.datetime.fromisoformat(value)).total_seconds())
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m" if seconds < 10800 else f"{seconds // 3600}h"


class MendedEmulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    requests_seen: list[tuple[str, str]]
    agents_seen: list[str]  # User-Agent of each request, in the same order (benchmark: whose request)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.requests_seen = []
        self.agents_seen = []
        self._keys_by_resource: dict[Any, list[Any]] = {}
        self._indexed = 0
        self._created_version: dict[str, int] = {}  # uid -> resourceVersion at creation (see _as_watched_since)
        self._deleted_version: dict[str, int] = {}  # uid -> resourceVersion of its deletion (see _deleted_since)
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
        key = (request.resource, request.namespace, request.name) if request.name else None
        response = await super()._handle(request)
        if key is not None and key in self.objects:
            self._note_deletion(self.objects[key])  # a DELETE, or an UPDATE that removed the last finalizer
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
            self._created_version[meta["uid"]] = int(meta["resourceVersion"])
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
                    self._note_deletion(obj)
                    await self._buses[resource].put({"type": "DELETED", "object": raw})

    def _note_deletion(self, obj: Any) -> None:
        if obj.deleted:
            self._deleted_version.setdefault(obj.last.raw.get("metadata", {}).get("uid", ""), time.monotonic_ns())

    async def _serve_list(self, request: rendering.Request) -> Any:
        """Lists get their kind (kubectl get/wait need it) and honour label and field selectors."""
        payload = await super()._serve_list(request)
        items = [i for i in payload["items"] if self._selected(request, i)]
        kind = self._kind(request.resource) or "Object"
        api_version = "/".join(filter(None, (request.resource.group, request.resource.version)))
        for item in items:
            item.setdefault("kind", kind)
            item.setdefault("apiVersion", api_version)
        if _wants_table(request):
            return _table(kind, items)
        return {"apiVersion": api_version, "kind": f"{kind}List",
                "metadata": {"resourceVersion": str(time.monotonic_ns())}, "items": items}

    def _serve_watch(self, request: rendering.Request) -> rendering.Response:
        """Watch streams are JSON (kmock's default octet-stream makes `kubectl get -w` give up)."""
        return rendering.Response(headers={"Content-Type": "application/json"}, payload=self._watch_events(request))

    async def _watch_events(self, request: rendering.Request) -> AsyncIterator[Any]:
        since = request.params.get("resourceVersion", "")
        from_version = since.isdigit() and int(since) > 0

        def shown(event: dict[str, Any]) -> dict[str, Any]:
            if _wants_table(request):
                return {**event, "object": _table(self._kind(request.resource), [event["object"]])}
            return event

        replayed = not from_version
        async for event in super()._serve_watch(request):
            if not isinstance(event, dict):  # b"": kmock's start of the stream, before its replay of what exists
                yield event
                for deleted in [] if replayed else self._deleted_since(request, int(since)):
                    yield shown(deleted)
                replayed = True
                continue
            if from_version:
                event = self._as_watched_since(event, int(since))
                if event is None:
                    continue
            if self._selected(request, event.get("object") or {}):
                yield shown(event)

    def _as_watched_since(self, event: dict[str, Any], since: int) -> dict[str, Any] | None:
        """A watch from a resourceVersion (kopf and `kubectl get -w` pass their list's) streams only what
        changed after it; kmock starts every watch with an ADDED event per stored object. Drop those the
        watcher's list already showed, and call an object created before that version but changed since
        MODIFIED, as a real API server does. Deletions since that version: see _deleted_since."""
        if event.get("type") != "ADDED":
            return event
        meta = event.get("object", {}).get("metadata", {})
        version = int(meta.get("resourceVersion") or 0)
        if version <= since:
            return None
        if self._created_version.get(meta.get("uid", ""), version) <= since:
            return {**event, "type": "MODIFIED"}
        return event

    def _deleted_since(self, request: rendering.Request, since: int) -> list[dict[str, Any]]:
        """A watch from a version also streams, as DELETED, what its list showed and was deleted after it
        (kmock's replay skips deleted objects, so the watcher would keep them forever). Objects both created
        and deleted after the version are left out: a real server sends ADDED then DELETED, which nets out. Not
        mended: an object deleted and created again under its name (kmock keeps one entry per name; the old
        one's DELETED is lost)."""
        events = []
        for obj in self._KubernetesEmulator__get_objs(request, strict=False):
            last = obj.last.raw if obj.deleted else None
            uid = (last or {}).get("metadata", {}).get("uid", "")
            if last is not None and self._created_version.get(uid, since + 1) <= since < \
                    self._deleted_version.get(uid, 0) and self._selected(request, last):
                events.append({"type": "DELETED", "object": {**last, "metadata": {
                    **last["metadata"], "resourceVersion": str(self._deleted_version[uid])}}})
        return events

    async def _serve_version(self, request: rendering.Request) -> Any:
        """Subresources carry no short names or categories (kmock copies them: kubectl warns on every `ftj`)."""
        found = await super()._serve_version(request)
        for entry in found["resources"]:
            if "/" in entry["name"]:
                entry.update(shortNames=[], categories=[])
        return found

    async def _serve_fetch(self, request: rendering.Request) -> Any:
        found = await super()._serve_fetch(request)
        return _table(self._kind(request.resource), [found]) if _wants_table(request) else found

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
