#!/usr/bin/env bash
# Builds (or reuses) the control-plane binaries the tests and `make cluster` run,
# and prints the folder that holds them. Cached outside the clone, keyed by the
# versions in go.mod, so only the first build on a machine pays.
set -euo pipefail
cd "$(dirname "$0")"

k8s_version=$(go list -m -f "{{.Version}}" k8s.io/kubernetes)
etcd_version=$(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)
cache_root=${KUBETUNE_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune/controlplane}
bin_dir="$cache_root/kubernetes-$k8s_version-etcd-$etcd_version"

programs=(kube-apiserver kube-controller-manager kube-scheduler etcd)
if [[ -f "$bin_dir/.complete" ]]; then
    echo "$bin_dir"
    exit 0
fi

mkdir -p "$bin_dir"
minor=${k8s_version#v1.}; minor=${minor%%.*}
# The version the server reports (kubectl version, helm's kubeVersion checks):
# without it a module build says v0.0.0-master.
ldflags="-s -w \
 -X k8s.io/component-base/version.gitVersion=$k8s_version \
 -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/client-go/pkg/version.gitVersion=$k8s_version"
echo "building kubernetes $k8s_version and etcd $etcd_version into $bin_dir (first time on this machine: long)" >&2
for program in "${programs[@]}"; do
    case $program in
        etcd) package=go.etcd.io/etcd/server/v3 ;;
        *) package=k8s.io/kubernetes/cmd/$program ;;
    esac
    start=$SECONDS
    CGO_ENABLED=0 go build -mod=readonly -trimpath -ldflags "$ldflags" -o "$bin_dir/$program.tmp" "$package"
    mv "$bin_dir/$program.tmp" "$bin_dir/$program"
    echo "  $program: $((SECONDS - start)) s" >&2
done
touch "$bin_dir/.complete"
echo "$bin_dir"
