#!/usr/bin/env bash
# Smoke test of the atlasgs-bids container image (minutes; not part of the pytest run).
#
#   tests/container/smoke.sh            # reuse the image atlasgs-bids:<version> when present, else build it
#   tests/container/smoke.sh --rebuild  # build it again
#
# Checks: the image label and `--version` equal the `version` file; `--help`; the demo (`atlasgs-bids demo`) inside
# the container as a non-root uid, with no network, a read-only image file system and the output on a bind mount;
# its outputs (dataset_description.json with the version and the container, the harmonised T2w NIfTI on the
# truth's grid, its sidecar's Version, group_qc.tsv ok); deepbet's bundled weights with no network. Prints time,
# peak memory and disk of the demo run. Exits 0 with "SKIP" when docker is not usable.
#
# Environment:
#   ATLASGS_IMAGE   image to test (default atlasgs-bids:<version>)
#   BASE            base image for a build (default: atlasgs-base:bookworm, made by docker/build-base.sh when absent
#                   and this runs as root with debootstrap; set BASE=python:3.11-slim-bookworm where registries work)
#   TORCH_WHEEL_DIR folder holding a torch CPU wheel for an offline build (default: pip's find-links, e.g.
#                   /opt/wheels, when it holds torch-2.13.0+cpu); served to the build on 127.0.0.1. Unset and no
#                   wheel found: the build takes torch 2.13.0 (CUDA build) from PyPI.
#   SMOKE_KEEP=1    keep the output folder
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"
version="$(tr -d '[:space:]' < version)"
image="${ATLASGS_IMAGE:-atlasgs-bids:$version}"
torch_spec_cpu="torch==2.13.0+cpu"

say() { printf '[smoke] %s\n' "$*"; }
fail() { printf '[smoke] FAIL: %s\n' "$*" >&2; exit 1; }

if ! command -v docker >/dev/null 2>&1; then
    say "SKIP: no docker client on PATH"; exit 0
fi
if ! docker info >/dev/null 2>&1; then
    say "SKIP: docker daemon not reachable (start dockerd, or run as a user in the docker group)"; exit 0
fi

# ------------------------------------------------------------------------------------------------------ build
build_image() {
    local base="${BASE:-atlasgs-base:bookworm}" args=() server_pid wheel_dir="${TORCH_WHEEL_DIR:-}"
    if [ "$base" = "atlasgs-base:bookworm" ] && ! docker image inspect "$base" >/dev/null 2>&1; then
        say "building the local base $base (docker/build-base.sh)"
        docker/build-base.sh "$base"
    fi
    if [ -z "$wheel_dir" ]; then
        for d in $(pip config get global.find-links 2>/dev/null || true) /opt/wheels; do
            if ls "$d"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then wheel_dir="$d"; break; fi
        done
    fi
    # a folder served to the build on 127.0.0.1: the torch CPU wheel (when found) and this host's CA bundle (for a
    # TLS-inspecting proxy between the build and PyPI)
    local serve port=$(( 20000 + RANDOM % 20000 ))
    serve="$(mktemp -d "${TMPDIR:-/tmp}/atlasgs-serve.XXXXXX")"
    args+=(--network host)
    if [ -n "$wheel_dir" ]; then
        ln -s "$wheel_dir"/torch-2.13.0+cpu-*.whl "$serve/"
        say "torch CPU wheel from $wheel_dir"
        args+=(--build-arg "PIP_FIND_LINKS=http://127.0.0.1:$port/" --build-arg "TORCH_SPEC=$torch_spec_cpu")
    fi
    for ca in "${PIP_CERT:-}" "${REQUESTS_CA_BUNDLE:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
        if [ -n "$ca" ] && [ -r "$ca" ]; then
            cp "$ca" "$serve/ca.pem"; args+=(--build-arg "PIP_CA_URL=http://127.0.0.1:$port/ca.pem"); break
        fi
    done
    python3 -m http.server "$port" --bind 127.0.0.1 --directory "$serve" >/dev/null 2>&1 &
    server_pid=$!
    sleep 1
    local t0=$SECONDS rc=0
    docker build "${args[@]}" --build-arg "BASE=$base" --build-arg "VERSION=$version" -t "$image" . || rc=$?
    kill "$server_pid" 2>/dev/null || true
    rm -rf "$serve"
    [ "$rc" -eq 0 ] || fail "docker build exited $rc"
    say "build time: $(( SECONDS - t0 )) s"
}

if [ "${1:-}" = "--rebuild" ] || ! docker image inspect "$image" >/dev/null 2>&1; then
    build_image
else
    say "reusing $image (pass --rebuild to build it again)"
fi
size=$(docker image inspect -f '{{.Size}}' "$image")
say "image $image: $(( size / 1000000 )) MB"

# ---------------------------------------------------------------------------------------- version, label, help
label=$(docker image inspect -f '{{index .Config.Labels "org.opencontainers.image.version"}}' "$image")
[ "$label" = "$version" ] || fail "image label version '$label' != version file '$version'"
say "label org.opencontainers.image.version = $label"
out=$(docker run --rm --network none "$image" --version)
[ "$out" = "atlasgs-bids $version" ] || fail "--version printed '$out', expected 'atlasgs-bids $version'"
say "--version: $out"
help=$(docker run --rm --network none "$image" --help)
grep -q "analysis_level\|participant" <<<"$help" || fail "--help lacks the BIDS-App usage"
say "--help: ok ($(wc -l <<<"$help") lines)"

# ------------------------------------------------------------------------------------------------------- demo
if [ "$(id -u)" -eq 0 ]; then user="12345:12345"; else user="$(id -u):$(id -g)"; fi
host_out="$(mktemp -d "${TMPDIR:-/tmp}/atlasgs-smoke.XXXXXX")"
chmod 0777 "$host_out"
cleanup() { [ "${SMOKE_KEEP:-0}" = 1 ] && say "kept $host_out" || rm -rf "$host_out"; }
trap cleanup EXIT
run_opts=(--network none --read-only --tmpfs /tmp:rw,exec,size=2g,mode=1777 --user "$user"
          -e OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" -v "$host_out:/out")

say "demo as uid $user, --network none, --read-only, output on $host_out"
# the entry point under a wrapper that reports what /usr/bin/time -v would (the image has no `time`): wall seconds,
# CPU seconds and the peak RSS of the largest process, over every finished descendant
wrap='import resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.call(["atlasgs-bids", *sys.argv[1:]])
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"[rusage] wall_s={time.perf_counter() - t0:.0f} cpu_s={ru.ru_utime + ru.ru_stime:.0f} "
      f"maxrss_mb={ru.ru_maxrss / 1024:.0f}", flush=True)
sys.exit(rc)'
cid=$(docker run -d "${run_opts[@]}" --entrypoint python "$image" -c "$wrap" demo /out/demo)
# sampled every second from the container's cgroup (v1, else v2): anonymous memory of all its processes (peak_rss),
# and CPU time (cpu_ns); 0 where this host does not expose them
peak_rss=0; cpu_ns=0
v1m=/sys/fs/cgroup/memory/docker/$cid; v1c=/sys/fs/cgroup/cpuacct/docker/$cid
v2=/sys/fs/cgroup/system.slice/docker-$cid.scope
while [ "$(docker inspect -f '{{.State.Running}}' "$cid")" = true ]; do
    rss=$( { awk '$1 == "total_rss" { print $2 }' "$v1m/memory.stat" || awk '$1 == "anon" { print $2 }' "$v2/memory.stat"; } 2>/dev/null | head -1)
    [ -n "$rss" ] && [ "$rss" -gt "$peak_rss" ] && peak_rss=$rss
    c=$( { cat "$v1c/cpuacct.usage" || awk '$1 == "usage_usec" { print $2 * 1000 }' "$v2/cpu.stat"; } 2>/dev/null | head -1)
    [ -n "$c" ] && cpu_ns=$c
    sleep 1
done
rc=$(docker wait "$cid")
docker logs "$cid" > "$host_out/demo.log" 2>&1 || true
usage=$(grep -o 'wall_s=.*' "$host_out/demo.log" | tail -1)
docker rm "$cid" >/dev/null
sed -n '/atlasgs-bids demo/,$p' "$host_out/demo.log"
[ "$rc" -eq 0 ] || { tail -40 "$host_out/demo.log"; fail "demo exited $rc"; }

# --------------------------------------------------------------------------------- outputs, and deepbet offline
docker run -i --rm "${run_opts[@]}" -e VERSION="$version" --entrypoint python "$image" - <<'PY' \
    || fail "output checks failed (above)"
import json, os, sys
from pathlib import Path

import nibabel as nib
import numpy as np

version = os.environ["VERSION"]
deriv = Path("/out/demo/derivatives")
desc = json.loads((deriv / "dataset_description.json").read_text())
gen = desc["GeneratedBy"][0]
assert gen["Version"] == version, f"dataset_description Version {gen['Version']} != {version}"
assert gen.get("Container", {}).get("Type") == "docker", f"GeneratedBy.Container: {gen.get('Container')}"
outs = sorted(deriv.glob("sub-*/anat/*_space-T1w_desc-atlasgs_T2w.nii.gz"))
assert outs, "no harmonised T2w in the derivatives"
img = nib.load(outs[0])
truth = nib.load(next(Path("/out/demo/truth").rglob("*T2w*.nii.gz")))
assert img.shape[:3] == truth.shape[:3] and np.allclose(img.affine, truth.affine, atol=1e-3), "not on the T1w grid"
data = img.get_fdata(dtype=np.float32)
assert np.isfinite(data).all() and (data != 0).mean() > 0.05, "harmonised T2w empty or not finite"
side = json.loads(Path(str(outs[0]).replace(".nii.gz", ".json")).read_text())
assert side["Version"] == version, f"sidecar Version {side['Version']} != {version}"
qc = (deriv / "group_qc.tsv").read_text().splitlines()
assert len(qc) >= 2 and "ok" in qc[1].split("\t"), f"group_qc.tsv: {qc[:2]}"
page = (deriv / "sub-01.html").read_text()
figures = sorted((deriv / "sub-01" / "figures").iterdir())
assert figures and all(f.name in page for f in figures), "QC report missing or without its figures"
assert (deriv / "group_qc.html").is_file(), "no group_qc.html"
print(f"[smoke] outputs: {outs[0].relative_to(deriv)} {img.shape}, sidecar Version {side['Version']}, "
      f"GeneratedBy.Container {gen['Container']}, group_qc row ok, sub-01.html with {len(figures)} figures")

# deepbet: its TorchScript weights load from the image and run with no network
from atlasgs_bids.imaging.brainmask import brain_mask
t1w = nib.load(next(deriv.glob("sub-*/anat/*_desc-preproc_T1w.nii.gz")))
mask = np.asarray(brain_mask(t1w, device="cpu").dataobj) > 0
ref = np.asarray(t1w.dataobj) > 0
dice = 2 * (mask & ref).sum() / (mask.sum() + ref.sum())
assert dice > 0.8, f"deepbet mask vs T1w>0: Dice {dice:.3f}"
print(f"[smoke] deepbet offline: brain mask Dice {dice:.3f} against the skull-stripped T1w > 0")
PY
owner=$(stat -c '%u:%g' "$host_out/demo/derivatives/dataset_description.json")
[ "$owner" = "$user" ] || fail "outputs owned by $owner, expected $user"
say "demo: exit 0, $usage (largest finished process), container: CPU $(( cpu_ns / 1000000000 )) s," \
    "peak RSS $(( peak_rss / 1000000 )) MB (all processes, sampled 1 s; 0 = cgroup not readable)," \
    "derivatives $(du -sh "$host_out/demo/derivatives" | cut -f1), work dir $(du -sh "$host_out/demo/work" | cut -f1)," \
    "files owned by $owner"
say "PASS"
