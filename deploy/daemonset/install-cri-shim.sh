#!/bin/sh
# Installs nodeplane-cri-shim as a host service from inside the DaemonSet's
# init container. The container needs the host's / mounted at $HOST_ROOT
# (hostPath "/", default /host) and runs privileged with hostPID, so that
# systemctl can be run in the host's namespaces via nsenter.
#
# Idempotent: an identical binary and unit are left alone and the running
# shim is not restarted (a restart would be harmless -- the shim holds no
# state -- but the kubelet would see a short UNAVAILABLE). A changed binary
# or unit is replaced atomically (rename) and the service restarted.
#
# It never touches the kubelet's configuration: switching the kubelet's
# --container-runtime-endpoint is a node-admin step (README, "CRI shim").
set -eu

HOST_ROOT=${HOST_ROOT:-/host}
SRC_BIN=${SRC_BIN:-/usr/local/bin/nodeplane-cri-shim}
SRC_UNIT=${SRC_UNIT:-/deploy/systemd/nodeplane-cri-shim.service}
DST_BIN=$HOST_ROOT/usr/local/bin/nodeplane-cri-shim
DST_UNIT=$HOST_ROOT/etc/systemd/system/nodeplane-cri-shim.service

changed=0
install_file() { # src dst mode
  if [ -f "$2" ] && cmp -s "$1" "$2"; then
    return 0
  fi
  mkdir -p "$(dirname "$2")"
  cp "$1" "$2.nodeplane-new"
  chmod "$3" "$2.nodeplane-new"
  mv -f "$2.nodeplane-new" "$2"
  changed=1
  echo "installed $2"
}

install_file "$SRC_BIN" "$DST_BIN" 0755
install_file "$SRC_UNIT" "$DST_UNIT" 0644

host() { nsenter --target 1 --mount --uts --ipc --net --pid -- "$@"; }
host systemctl daemon-reload
host systemctl enable nodeplane-cri-shim.service
if [ "$changed" = 1 ]; then
  host systemctl restart nodeplane-cri-shim.service
else
  host systemctl start nodeplane-cri-shim.service
fi
host systemctl is-active --quiet nodeplane-cri-shim.service
echo "nodeplane-cri-shim active; kubelet endpoint: unix:///run/nodeplane/cri.sock"
