"""Just enough of Kubernetes' protobuf wire format to read the Secrets and ConfigMaps that client-go's typed
clients send (Helm stores its release record that way; `kubectl create secret` too). The emulator speaks JSON."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

ENVELOPE_MAGIC = b"k8s\x00"  # runtime.Unknown follows: 1 typeMeta{1 apiVersion, 2 kind}, 2 raw object
META_STRINGS = {1: "name", 2: "generateName", 3: "namespace", 5: "uid", 6: "resourceVersion"}  # ObjectMeta
META_MAPS = {11: "labels", 12: "annotations"}


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i
        shift += 7


def fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) pairs of one message: ints for varints, bytes for everything else."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def _map(entries: list[bytes], binary: bool) -> dict[str, str]:
    out = {}
    for entry in entries:
        pair = dict(fields(entry))
        value = pair.get(2, b"")
        out[pair[1].decode()] = base64.b64encode(value).decode() if binary else value.decode()
    return out


def _metadata(buf: bytes) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    maps: dict[int, list[bytes]] = {}
    for number, value in fields(buf):
        if number in META_STRINGS:
            meta[META_STRINGS[number]] = value.decode()
        elif number in META_MAPS:
            maps.setdefault(number, []).append(value)
    meta.update({META_MAPS[n]: _map(entries, binary=False) for n, entries in maps.items()})
    return meta


# Field numbers after 1 (metadata): maps as (name, values are bytes), scalars as (name, type).
MAPS: dict[str, dict[int, tuple[str, bool]]] = {"Secret": {2: ("data", True), 4: ("stringData", False)},
        "ConfigMap": {2: ("data", False), 3: ("binaryData", True)}}
SCALARS: dict[str, dict[int, tuple[str, type]]] = {"Secret": {3: ("type", str), 5: ("immutable", bool)},
                                                  "ConfigMap": {4: ("immutable", bool)}}


def decode(body: bytes) -> dict[str, Any]:
    """A Secret or ConfigMap in the protobuf envelope as the JSON dict the API would have received."""
    if not body.startswith(ENVELOPE_MAGIC):
        raise ValueError("not a Kubernetes protobuf envelope")
    envelope = dict(fields(body[len(ENVELOPE_MAGIC):]))
    type_meta = {n: v.decode() for n, v in fields(envelope[1])}
    kind = type_meta.get(2, "")
    if kind not in MAPS:
        raise ValueError(f"protobuf {kind or 'object'} is not understood here")
    obj: dict[str, Any] = {"apiVersion": type_meta.get(1), "kind": kind}
    entries: dict[int, list[bytes]] = {}
    for number, value in fields(envelope[2]):
        if number == 1:
            obj["metadata"] = _metadata(value)
        elif number in MAPS[kind]:
            entries.setdefault(number, []).append(value)
        elif number in SCALARS[kind]:
            name, kind_of = SCALARS[kind][number]
            obj[name] = value.decode() if kind_of is str else bool(value)
    for number, values in entries.items():
        name, binary = MAPS[kind][number]
        obj[name] = _map(values, binary)
    return obj
