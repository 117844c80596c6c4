#!/usr/bin/env bash
# nodeplane quick start: a standalone node on this machine, no Kubernetes.
#
# Builds nodeplane-cni and nodeplane-agent, makes a "node" network namespace
# (so your host's own routes and firewall are never touched), starts the
# agent in it in standalone mode (manifests from deploy/standalone/), wires
# three pods into it with the example network configuration
# deploy/cni/10-nodeplane.conflist, shows their addresses, pings and TCP
# between them and the node over IPv4 and IPv6, then applies the example
# NetworkPolicy and shows an allowed and a denied connection. Then the app
# runtime: two demo apps (np-app) in pods a and b invoke each other and keep
# state through the node's runtime (Dapr's HTTP API at 169.254.1.1:3500),
# a pod without an app id is refused app-scoped state, and b subscribes to
# a topic that a publishes to (the node's embedded pub/sub). Then the CSI
# driver: `nodeplane-agent csi` in standalone mode on a pool image it makes
# in a temp dir (a loop-mounted xfs, in a private mount namespace, so neither
# the host disk nor the host's mounts are used), provisions a 64 MiB volume
# with nodeplane-csictl, stages and publishes it, writes to it, shows that
# writing past 64 MiB fails with ENOSPC, prints NodeGetVolumeStats, and
# unpublishes, unstages and deletes it. Then it removes everything (the CSI
# part always, even on failure). Pass --keep to leave the node and pods up.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "quickstart: run as root (it creates network namespaces)" >&2; exit 1; }
missing=()
command -v ip >/dev/null || missing+=(iproute2)
[ -x /bin/busybox ] || missing+=(busybox-static)
[ -x /usr/lib/cni/portmap ] || missing+=(containernetworking-plugins)
command -v iptables >/dev/null || missing+=(iptables)
command -v nft >/dev/null || missing+=(nftables)
command -v conntrack >/dev/null || missing+=(conntrack)
command -v protoc >/dev/null || missing+=(protobuf-compiler)
command -v mkfs.xfs >/dev/null || missing+=(xfsprogs)
command -v nsenter >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

echo "==> building nodeplane-cni, nodeplane-agent, nodeplane-csictl and the demo app np-app (release; the first build takes a few minutes)"
cargo build --release -q -p nodeplane-cni -p nodeplane-agent -p nodeplane-csi
cargo build --release -q -p nodeplane-tests --bin np-app
# .cargo/config.toml builds for the explicit host tuple (static binaries).
BIN="$PWD/target/$(rustc -vV | sed -n 's/^host: //p')/release"
TOOL="$BIN/nodeplane-cnitool"
CONF="$PWD/deploy/cni/10-nodeplane.conflist"
export CNI_PATH="$BIN:/usr/lib/cni"
# The demo keeps its IPAM state apart from a real install's /var/lib/nodeplane.
export NODEPLANE_STATE_DIR=/run/nodeplane-demo/cni
export NODEPLANE_AGENT_SOCKET=/run/nodeplane-demo/agent.sock
MANIFESTS=/run/nodeplane-demo/manifests
NODE=np-demo-node
PODS=(a b c)
KEEP=${1:-}

cleanup() {
  for p in "${PODS[@]}"; do
    ip netns exec "$NODE" "$TOOL" del "$CONF" "/run/netns/np-demo-$p" "demo-$p" 2>/dev/null || true
    ip netns delete "np-demo-$p" 2>/dev/null || true
  done
  [ -f /run/nodeplane-demo/agent.pid ] && kill "$(cat /run/nodeplane-demo/agent.pid)" 2>/dev/null || true
  ip netns delete "$NODE" 2>/dev/null || true
  rm -rf /run/nodeplane-demo
}

# GET a path from the agent's health/metrics endpoint inside the node.
agent_get() {
  ip netns exec "$NODE" bash -c 'exec 3<>/dev/tcp/127.0.0.1/9650 && printf "GET %s HTTP/1.0\r\n\r\n" "$1" >&3 && cat <&3' _ "$1" 2>/dev/null
}
# Waits until the agent has programmed a model with $1 policies.
wait_policies() {
  for _ in $(seq 1 100); do
    agent_get /status | grep -q "\"policies\":$1,\"programmed\":true" && return 0
    sleep 0.1
  done
  echo "quickstart: the agent did not program $1 policies; its log:" >&2
  cat /run/nodeplane-demo/agent.log >&2
  return 1
}
# Waits (up to 5 s) until something in pod $1 listens on TCP port $2: a
# server started in the background a moment ago may not have bound yet.
wait_listen() {
  for _ in $(seq 1 50); do
    ip netns exec "np-demo-$1" ss -Hltn "sport = :$2" | grep -q . && return 0
    sleep 0.1
  done
  echo "quickstart: nothing listens on pod $1 port $2 after 5 s" >&2
}
# The CSI demo's world: a temp dir with the pool image, a mount namespace
# held by a sleeping process, the driver in it. Torn down on every exit.
CSI_DIR="" CSI_NS="" CSI_DRIVER="" POOL_DEV=""
in_ns() { nsenter -t "$CSI_NS" -m -- "$@"; }
csi_cleanup() {
  [ -n "$CSI_DIR" ] || return 0
  if [ -n "$CSI_DRIVER" ]; then kill "$CSI_DRIVER" 2>/dev/null || true; wait "$CSI_DRIVER" 2>/dev/null || true; fi
  if [ -n "$CSI_NS" ]; then
    # Whatever a failed run left mounted; the namespace's end drops the rest.
    in_ns sh -c "umount -R $CSI_DIR/pod $CSI_DIR/staging $CSI_DIR/state $CSI_DIR/pool" 2>/dev/null || true
    kill "$CSI_NS" 2>/dev/null || true; wait "$CSI_NS" 2>/dev/null || true
  fi
  # Volume loop devices (backing files in the pool), then the pool's own.
  for _ in $(seq 1 50); do
    losetup -l -n -O NAME,BACK-FILE | awk -v d="$CSI_DIR/" 'index($2, d) == 1 {print $1}' | xargs -r -n1 losetup -d 2>/dev/null || true
    [ -n "$POOL_DEV" ] && losetup -d "$POOL_DEV" 2>/dev/null || true
    losetup -l -n -O BACK-FILE | grep -q "^$CSI_DIR/" || break
    sleep 0.1
  done
  rm -rf "$CSI_DIR"
  CSI_DIR=""
}
if [ "$KEEP" != "--keep" ]; then trap 'csi_cleanup; cleanup' EXIT; else trap csi_cleanup EXIT; fi
cleanup

echo "==> node namespace $NODE (node address 10.10.0.1, fd00:10:10::1)"
ip netns add "$NODE"
ip -n "$NODE" link set lo up
ip -n "$NODE" addr add 10.10.0.1/32 dev lo
ip -n "$NODE" addr add fd00:10:10::1/128 dev lo

echo "==> nodeplane-agent in the node, standalone mode (manifests: deploy/standalone/cluster.yaml)"
mkdir -p "$MANIFESTS"
cp deploy/standalone/cluster.yaml "$MANIFESTS/"
ip netns exec "$NODE" "$BIN/nodeplane-agent" --manifests-dir "$MANIFESTS" \
  --state-dir /run/nodeplane-demo/agent --cni-state-dir "$NODEPLANE_STATE_DIR" \
  --socket "$NODEPLANE_AGENT_SOCKET" --listen 127.0.0.1:9650 --runtime-dir /run/nodeplane-demo/runtime \
  --pod-cidr 10.244.0.0/24,fd00:10:244::/64 --node-name demo-node \
  > /run/nodeplane-demo/agent.log 2>&1 &
echo $! > /run/nodeplane-demo/agent.pid
wait_policies 0
echo "    ready: $(agent_get /readyz | tail -1)"

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
# Not pod b's app port (8080): the node runtime connects there to ask the
# app for its subscriptions, and this nc accepts one connection only.
ip netns exec np-demo-b busybox nc -l -p 9000 > /run/nodeplane-demo/received & srv=$!
wait_listen b 9000
DESC="tcp   pod a -> pod b  ${V4[b]}:9000"; check sh -c "echo hello-from-a | ip netns exec np-demo-a busybox nc -w 2 ${V4[b]} 9000"
wait $srv || true
echo "    pod b received: $(cat /run/nodeplane-demo/received)"

echo "==> NetworkPolicy: applying deploy/standalone/policy.yaml (role=web accepts only role=client on port http)"
cp deploy/standalone/policy.yaml "$MANIFESTS/"
wait_policies 1
ip netns exec np-demo-b busybox nc -ll -p 8080 -e echo web-b-says-hi & srv=$!
wait_listen b 8080
DESC="allowed: pod a (client) -> pod b (web) :8080"; check sh -c "ip netns exec np-demo-a busybox nc -w 2 ${V4[b]} 8080 </dev/null | grep -q web-b-says-hi"
DESC="denied:  pod c (other)  -> pod b (web) :8080"; check sh -c "! ip netns exec np-demo-c busybox nc -w 2 ${V4[b]} 8080 </dev/null | grep -q web-b-says-hi"
DESC="allowed: pod c -> pod a (not selected by any policy)"; check ip netns exec np-demo-c busybox ping -c1 -W2 "${V4[a]}"
kill $srv 2>/dev/null || true
wait $srv 2>/dev/null || true
echo "    per-policy counter: $(agent_get /metrics | grep '^nodeplane_policy_allowed_packets_total' | head -1)"
echo "    dropped:            $(agent_get /metrics | grep '^nodeplane_dropped_packets_total{reason="denied_ingress"}')"

echo "==> app runtime: pod a is app \"orders\", pod b app \"stock\" (np-app on :8080); they call the node runtime at 169.254.1.1:3500"
APPS=()
# stock subscribes to topic "orders" of the node's embedded pub/sub (its
# answer to the runtime's GET /dapr/subscribe; deliveries go to /sub/orders).
SUBS='[{"pubsubname":"pubsub","topic":"orders","route":"/sub/orders"}]'
ip netns exec np-demo-a "$BIN/np-app" serve 8080 > /dev/null & APPS+=($!)
NP_APP_SUBSCRIBE="$SUBS" ip netns exec np-demo-b "$BIN/np-app" serve 8080 > /dev/null & APPS+=($!)
wait_listen a 8080; wait_listen b 8080
rt_call() { ip netns exec "np-demo-$1" "$BIN/np-app" call "${@:2}"; }
for _ in $(seq 1 50); do rt_call a GET /v1.0/metadata 2>/dev/null | grep -q '"id":"orders"' && break; sleep 0.1; done
out=$(rt_call a POST /v1.0/invoke/stock/method/reserve '{"item":"apple"}' 2>&1 || true)
echo "    orders -> stock  POST /reserve: $out"
DESC="invoke: orders -> stock through the runtime, the app sees caller orders"; check grep -q '^200 {"item":"apple"} (caller orders)' <<<"$out"
for i in 1 2 3; do out=$(rt_call b POST /v1.0/invoke/orders/method/count 2>&1 || true); echo "    stock -> orders  POST /count: $out"; done
DESC="orders keeps a counter in the embedded state store (third call answers 3)"; check grep -q '^200 3' <<<"$out"
out=$(rt_call a GET /v1.0/state/statestore/count 2>&1 || true)
echo "    orders reads its state key count: $out"
DESC="state: orders reads count = 3"; check grep -q '^200 3' <<<"$out"
out=$(rt_call b GET /v1.0/state/statestore/count 2>&1 || true)
DESC="state keys are per app: stock's own count is empty (204)"; check grep -q '^204' <<<"$out"
out=$(rt_call c POST /v1.0/state/statestore '[{"key":"k","value":1}]' 2>&1 || true)
echo "    pod c (no app id) saving state: $out"
DESC="identity: pod c has no app id, app-scoped state is refused (403)"; check grep -q '^403' <<<"$out"
# The runtime asks an app for its subscriptions once the pod is ready and
# again while the app does not answer (backing off up to 6.4 s): wait until
# stock's metadata lists the subscription as joined before publishing.
for _ in $(seq 1 200); do rt_call b GET /v1.0/metadata 2>/dev/null | grep -q '"topic":"orders"' && break; sleep 0.1; done
out=$(rt_call b GET /v1.0/metadata 2>&1 || true)
echo "    stock's subscriptions (its /v1.0/metadata): $(grep -o '"subscriptions":.*' <<<"$out" | grep -o '"pubsubname":"[^"]*"\|"topic":"[^"]*"' | tr '\n' ' ')"
DESC="pub/sub: stock's subscription to pubsub/orders is joined"; check grep -q '"topic":"orders"' <<<"$out"
out=$(rt_call a POST /v1.0/publish/pubsub/orders '{"key":"hello"}' 2>&1 || true)
echo "    orders publishes {\"key\":\"hello\"} to pubsub/orders: $out"
DESC="pub/sub: the runtime accepted the publish (204)"; check grep -q '^204' <<<"$out"
got=""
for _ in $(seq 1 50); do
  got=$(ip netns exec np-demo-b "$BIN/np-app" call GET http://127.0.0.1:8080/deliveries 2>/dev/null || true)
  grep -q '"key":"hello"' <<<"$got" && break
  sleep 0.1
done
echo "    stock's deliveries: $(grep -o '"key":"[^"]*"\|"path":"[^"]*"\|"contentType":"[^"]*"' <<<"$got" | tr '\n' ' ')"
DESC="pub/sub: stock got the message at /sub/orders (a CloudEvent)"; check bash -c 'grep -q "\"key\":\"hello\"" <<<"$1" && grep -q "\"path\":\"/sub/orders\"" <<<"$1"' _ "$got"
kill "${APPS[@]}" 2>/dev/null || true

echo "==> CSI driver, standalone: nodeplane-agent csi on a 1 GiB xfs pool image (loop device, private mount namespace)"
CSI_DIR=$(mktemp -d /tmp/nodeplane-csi-demo.XXXXXX)
mkdir -p "$CSI_DIR/pool" "$CSI_DIR/state" "$CSI_DIR/staging" "$CSI_DIR/pod"
truncate -s 1G "$CSI_DIR/pool.img"
POOL_DEV=$(losetup --find --show "$CSI_DIR/pool.img")
mkfs.xfs -q "$POOL_DEV"
unshare --mount --propagation private sleep infinity & CSI_NS=$!
for _ in $(seq 1 100); do [ "$(readlink /proc/$CSI_NS/ns/mnt)" != "$(readlink /proc/self/ns/mnt)" ] && break; sleep 0.05; done
in_ns mount "$POOL_DEV" "$CSI_DIR/pool"
CSI_EP="unix://$CSI_DIR/csi.sock"
# nsenter itself, not the in_ns function: `function &` would make $! a
# subshell, and killing that left the driver running after the demo.
# nsenter (mount namespace only) execs the driver, so $! is the driver.
nsenter -t "$CSI_NS" -m -- "$BIN/nodeplane-agent" csi --endpoint "$CSI_EP" --node-id demo-node \
  --state-dir "$CSI_DIR/state" --pool "$CSI_DIR/pool" > "$CSI_DIR/driver.log" 2>&1 & CSI_DRIVER=$!
for _ in $(seq 1 100); do [ -S "$CSI_DIR/csi.sock" ] && break; sleep 0.1; done
csictl() { "$BIN/nodeplane-csictl" --endpoint "$CSI_EP" "$@"; }
csi_fail() { echo "    FAIL  $1; the driver's log:"; cat "$CSI_DIR/driver.log"; fail=$((fail+1)); }
if ! [ -S "$CSI_DIR/csi.sock" ]; then
  csi_fail "the CSI driver did not start"
else
  echo "    pool capacity: $(csictl capacity)"
  if created=$(csictl create demo-vol --size 64Mi --fs-type ext4); then
    VOL=$(cut -f1 <<<"$created")
    echo "    CreateVolume demo-vol 64Mi ext4 -> $created"
    T="$CSI_DIR/pod/vol"
    if csictl stage "$VOL" "$CSI_DIR/staging" --fs-type ext4 >/dev/null &&
       csictl publish "$VOL" "$CSI_DIR/staging" "$T" --fs-type ext4 >/dev/null; then
      echo "    NodeStageVolume + NodePublishVolume -> $T"
      in_ns df -h --output=source,fstype,size,used,avail,target "$T" | sed 's/^/    /'
      DESC="write a file to the volume"; check in_ns sh -c "echo hello-from-csi > $T/hello.txt && grep -q hello-from-csi $T/hello.txt"
      out=$(in_ns dd if=/dev/zero of="$T/big" bs=1M count=100 conv=fsync 2>&1) && rc=0 || rc=$?
      echo "    dd 100 MiB into the 64 MiB volume: $(grep -o 'No space left on device' <<<"$out" | head -1 || true) (exit $rc)"
      DESC="writing past the 64 MiB limit fails with ENOSPC"; check test "$rc" != 0 -a -n "$(grep 'No space left on device' <<<"$out")"
      echo "    NodeGetVolumeStats (with the 64 MiB file-filling write in place):"
      csictl stats "$VOL" "$T" | sed 's/^/      /'
      in_ns rm -f "$T/big"
      DESC="NodeUnpublishVolume"; check csictl unpublish "$VOL" "$T"
      DESC="NodeUnstageVolume"; check csictl unstage "$VOL" "$CSI_DIR/staging"
    else
      csi_fail "stage/publish of $VOL"
    fi
    DESC="DeleteVolume"; check csictl delete "$VOL"
    DESC="its image is gone from the pool"; check in_ns sh -c "! ls $CSI_DIR/pool/images/ | grep -q ."
    echo "    pool capacity after delete: $(csictl capacity)"
  else
    csi_fail "CreateVolume"
  fi
fi
csi_cleanup
echo "    CSI demo removed (driver stopped, mounts gone, loop devices detached)"

if [ "$KEEP" = "--keep" ]; then
  echo "==> left running: ip netns exec np-demo-a sh; remove with: $0 (without --keep)"
else
  echo "==> removing pods (CNI DEL through the conflist)"
fi
echo "$ok passed, $fail failed"
[ "$fail" = 0 ]
