#!/usr/bin/env bash
# nodeplane quick start: a standalone node on this machine, no Kubernetes.
#
# Builds nodeplane-cni, makes a "node" network namespace (so your host's own
# routes are never touched), wires three pods into it with the example
# network configuration deploy/cni/10-nodeplane.conflist, shows their
# addresses, pings and TCP between them and the node over IPv4 and IPv6, then
# removes everything. Pass --keep to leave the node and pods up to explore.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "quickstart: run as root (it creates network namespaces)" >&2; exit 1; }
missing=()
command -v ip >/dev/null || missing+=(iproute2)
[ -x /bin/busybox ] || missing+=(busybox-static)
[ -x /usr/lib/cni/portmap ] || missing+=(containernetworking-plugins)
command -v iptables >/dev/null || missing+=(iptables)
command -v protoc >/dev/null || missing+=(protobuf-compiler)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

echo "==> building nodeplane-cni (release)"
cargo build --release -q -p nodeplane-cni
# .cargo/config.toml builds for the explicit host tuple (static binaries).
BIN="$PWD/target/$(rustc -vV | sed -n 's/^host: //p')/release"
TOOL="$BIN/nodeplane-cnitool"
CONF="$PWD/deploy/cni/10-nodeplane.conflist"
export CNI_PATH="$BIN:/usr/lib/cni"
# The demo keeps its IPAM state apart from a real install's /var/lib/nodeplane.
export NODEPLANE_STATE_DIR=/run/nodeplane-demo/cni
NODE=np-demo-node
PODS=(a b c)
KEEP=${1:-}

cleanup() {
  for p in "${PODS[@]}"; do
    ip netns exec "$NODE" "$TOOL" del "$CONF" "/run/netns/np-demo-$p" "demo-$p" 2>/dev/null || true
    ip netns delete "np-demo-$p" 2>/dev/null || true
  done
  ip netns delete "$NODE" 2>/dev/null || true
  rm -rf /run/nodeplane-demo
}
if [ "$KEEP" != "--keep" ]; then trap cleanup EXIT; fi
cleanup

echo "==> node namespace $NODE (node address 10.10.0.1, fd00:10:10::1)"
ip netns add "$NODE"
ip -n "$NODE" link set lo up
ip -n "$NODE" addr add 10.10.0.1/32 dev lo
ip -n "$NODE" addr add fd00:10:10::1/128 dev lo

declare -A V4 V6
for p in "${PODS[@]}"; do
  ip netns add "np-demo-$p"
  ip -n "np-demo-$p" link set lo up
  result=$(CNI_ARGS="K8S_POD_NAMESPACE=demo;K8S_POD_NAME=$p" ip netns exec "$NODE" "$TOOL" add "$CONF" "/run/netns/np-demo-$p" "demo-$p")
  V4[$p]=$(grep -o '"address": "[0-9.]*' <<<"$result" | head -1 | cut -d'"' -f4)
  V6[$p]=$(grep -o '"address": "[0-9a-f:]*:[0-9a-f:]*' <<<"$result" | head -1 | cut -d'"' -f4)
  echo "    pod $p: ${V4[$p]}  ${V6[$p]}"
done

echo "==> pod a's view: addresses and routes"
ip -n np-demo-a -br addr show eth0
ip -n np-demo-a route; ip -n np-demo-a -6 route show default
echo "==> node's routes to its pods"
ip -n "$NODE" route show proto 110

ok=0; fail=0
check() { if "$@" >/dev/null 2>&1; then echo "    ok    $DESC"; ok=$((ok+1)); else echo "    FAIL  $DESC"; fail=$((fail+1)); fi; }
echo "==> traffic"
DESC="ping  pod a -> pod b  ${V4[b]}"; check ip netns exec np-demo-a busybox ping -c1 -W2 "${V4[b]}"
DESC="ping  pod a -> pod c  ${V6[c]}"; check ip netns exec np-demo-a busybox ping -c1 -W2 "${V6[c]}"
DESC="ping  node  -> pod b  ${V4[b]}"; check ip netns exec "$NODE" busybox ping -c1 -W2 "${V4[b]}"
DESC="ping  pod c -> node   10.10.0.1"; check ip netns exec np-demo-c busybox ping -c1 -W2 10.10.0.1
ip netns exec np-demo-b busybox nc -l -p 8080 > /run/nodeplane-demo/received & srv=$!
sleep 0.3
DESC="tcp   pod a -> pod b  ${V4[b]}:8080"; check sh -c "echo hello-from-a | ip netns exec np-demo-a busybox nc -w 2 ${V4[b]} 8080"
wait $srv || true
echo "    pod b received: $(cat /run/nodeplane-demo/received)"

if [ "$KEEP" = "--keep" ]; then
  echo "==> left running: ip netns exec np-demo-a sh; remove with: $0 (without --keep)"
else
  echo "==> removing pods (CNI DEL through the conflist)"
fi
echo "$ok passed, $fail failed"
[ "$fail" = 0 ]
