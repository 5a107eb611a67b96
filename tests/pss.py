"""The Kubernetes "restricted" Pod Security Standard (baseline + restricted), field by field.

https://kubernetes.io/docs/concepts/security/pod-security-standards/ (policy version v1.33). Shared by the
chart's operator Deployment test and the operator's trainer pod test: pass a PodSpec dict (camelCase, as
rendered or built), get one message per violated rule, each naming the field.
"""

from __future__ import annotations

from typing import Any

ALLOWED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                        "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
SECCOMP_OK = {"RuntimeDefault", "Localhost"}
APPARMOR_OK = {"RuntimeDefault", "Localhost"}


def _containers(pod_spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{kind}[{c.get('name', i)}]", c) for kind in ("initContainers", "containers", "ephemeralContainers")
            for i, c in enumerate(pod_spec.get(kind) or [])]


def _security_context_rules(where: str, sc: dict[str, Any]) -> list[str]:
    """Rules that apply to the pod's and to each container's securityContext alike."""
    problems = []
    if (sc.get("windowsOptions") or {}).get("hostProcess"):
        problems.append(f"{where}.windowsOptions.hostProcess must be unset or false")
    selinux = sc.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in SELINUX_TYPES:
        problems.append(f"{where}.seLinuxOptions.type {selinux['type']!r} is not allowed")
    for key in ("user", "role"):
        if selinux.get(key):
            problems.append(f"{where}.seLinuxOptions.{key} must be unset")
    apparmor = (sc.get("appArmorProfile") or {}).get("type")
    if apparmor is not None and apparmor not in APPARMOR_OK:
        problems.append(f"{where}.appArmorProfile.type must be RuntimeDefault or Localhost, not {apparmor}")
    if sc.get("runAsNonRoot") is False:
        problems.append(f"{where}.runAsNonRoot must not be false")
    if sc.get("runAsUser") == 0:
        problems.append(f"{where}.runAsUser must not be 0")
    seccomp = (sc.get("seccompProfile") or {}).get("type")
    if seccomp is not None and seccomp not in SECCOMP_OK:
        problems.append(f"{where}.seccompProfile.type must be RuntimeDefault or Localhost, not {seccomp}")
    return problems


def restricted_violations(pod_spec: dict[str, Any], annotations: dict[str, str] | None = None) -> list[str]:
    """Every way `pod_spec` breaks the restricted standard (empty when it meets it)."""
    problems: list[str] = []
    pod_sc = pod_spec.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(key):
            problems.append(f"spec.{key} must be unset or false")
    problems += _security_context_rules("spec.securityContext", pod_sc)
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            problems.append(f"spec.securityContext.sysctls: {sysctl.get('name')} is not a safe sysctl")
    for volume in pod_spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if "hostPath" in kinds:
            problems.append(f"spec.volumes[{volume.get('name')}].hostPath is not allowed")
        elif not kinds <= ALLOWED_VOLUME_TYPES:
            problems.append(f"spec.volumes[{volume.get('name')}]: volume type {sorted(kinds)} is not allowed")
    for key, value in (annotations or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and value != "runtime/default" \
                and not value.startswith("localhost/"):
            problems.append(f"metadata.annotations[{key}] must be runtime/default or localhost/*")

    pod_non_root = pod_sc.get("runAsNonRoot") is True
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type") in SECCOMP_OK
    for where, container in _containers(pod_spec):
        sc = container.get("securityContext") or {}
        where_sc = f"spec.{where}.securityContext"
        problems += _security_context_rules(where_sc, sc)
        if sc.get("privileged"):
            problems.append(f"{where_sc}.privileged must be unset or false")
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"{where_sc}.procMount must be unset or Default")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where_sc}.allowPrivilegeEscalation must be false")
        if not pod_non_root and sc.get("runAsNonRoot") is not True:
            problems.append(f"{where_sc}.runAsNonRoot must be true (or spec.securityContext.runAsNonRoot)")
        if not pod_seccomp and (sc.get("seccompProfile") or {}).get("type") not in SECCOMP_OK:
            problems.append(f"{where_sc}.seccompProfile.type must be RuntimeDefault or Localhost "
                            "(here or in spec.securityContext)")
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            problems.append(f"{where_sc}.capabilities.drop must include ALL")
        extra = set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}
        if extra:
            problems.append(f"{where_sc}.capabilities.add may hold only NET_BIND_SERVICE, not {sorted(extra)}")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                problems.append(f"spec.{where}.ports[{port.get('name', port.get('containerPort'))}].hostPort "
                                "must be unset or 0")
    return problems
