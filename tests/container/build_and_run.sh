#!/usr/bin/env bash
# Build the grazbids image from the real Dockerfile without a Docker engine and run it on a
# tiny BIDS dataset.
#
#   1. base image: Debian bookworm made with debootstrap (public registries are unreachable),
#      imported with `FROM scratch` + `ADD rootfs.tar /`; cached under $CACHE
#   2. build: `buildah bud --isolation chroot --storage-driver vfs` of ./Dockerfile with
#      --build-arg BASE_IMAGE=<that base>; the build context is a temporary copy of the working
#      tree (tracked + untracked, not ignored files) plus the local CPU PyTorch wheel in wheels/
#      (never committed; the default build takes torch from download.pytorch.org instead)
#   3. run: `buildah run` as the image's non-root user, input mounted read-only, in a network
#      namespace with no interfaces (no network at run time): --version, --boutiques,
#      participant, group (--epochs 1 --cv-folds 2); outputs are checked
#
# Needs root, buildah, debootstrap (apt-get install buildah debootstrap) and network access to
# the Debian mirror and PyPI for the build. Takes about 15-25 minutes on 2 cores (see
# docs/containers.md). Usage:
#
#   tests/container/build_and_run.sh [all|base|build|run]     (default: all)
#
# Environment:
#   GRAZBIDS_CONTAINER_CACHE  cache folder (default /var/tmp/grazbids-container): debootstrap
#                             rootfs tarball and buildah storage
#   IMAGE                     image name (default localhost/grazbids:test)
#   BASE_IMAGE                another base image already in the cache's storage (default: the
#                             debootstrap one, made when missing)
#   PYTHON                    Python with nibabel/nilearn/numpy for making the tiny dataset
#                             (default: .venv/bin/python of the repository, else python3)
#   REAL_BIDS                 real dataset to downsample (default ../shared/data/ds002748);
#                             synthetic images are used when it is absent
#   WHEELS_DIR                folder with the local torch wheel (default /opt/wheels); when it
#                             has none, PyTorch comes from TORCH_INDEX_URL
#   TORCH_SPEC, TORCH_INDEX_URL  passed to the build (see Dockerfile); setting TORCH_INDEX_URL
#                             (even empty: PyPI, whose Linux torch is a CUDA build) skips the
#                             local wheel, e.g. for a CUDA image:
#                             IMAGE=localhost/grazbids:cuda IMAGE_TAG=grazbids:0.1.0-cuda TORCH_INDEX_URL= \
#                                 tests/container/build_and_run.sh build
#   IMAGE_TAG                 recorded tag (GeneratedBy.Container.Tag; default grazbids:<version>)
#   PIP_INDEX_URL             a PyPI mirror for every pip step of the build (PyTorch's too)
#   SAVE_ARCHIVE              if set, also write the image as a docker-archive tarball there
#                             (input for `apptainer build grazbids.sif docker-archive://...`)
#   RESULTS                   file that receives key=value measurements (default
#                             $CACHE/results.env)
#   KEEP_RUN_DIR=1            keep the temporary dataset/output folder
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
STEP=${1:-all}
CACHE=${GRAZBIDS_CONTAINER_CACHE:-/var/tmp/grazbids-container}
IMAGE=${IMAGE:-localhost/grazbids:test}
DEFAULT_BASE=localhost/grazbids-base:bookworm
BASE_IMAGE=${BASE_IMAGE:-$DEFAULT_BASE}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WHEELS_DIR=${WHEELS_DIR:-/opt/wheels}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
REAL_BIDS=${REAL_BIDS:-$REPO/../shared/data/ds002748}
RESULTS=${RESULTS:-$CACHE/results.env}
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$REPO/grazbids/__init__.py")
UID_IN_IMAGE=1000

log() { printf '[build_and_run %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
record() { # key value: remember a measurement
    mkdir -p "$(dirname "$RESULTS")"
    touch "$RESULTS"
    sed -i "/^$1=/d" "$RESULTS"
    echo "$1=$2" >>"$RESULTS"
    log "$1=$2"
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
bh() { buildah --root "$CACHE/storage" --runroot "$CACHE/runroot" --storage-driver vfs "$@"; }

# temporary folders and working containers, removed on any exit (also after a failure)
TEMP_DIRS=()
CONTAINERS=()
cleanup() {
    local ctr dir
    for ctr in "${CONTAINERS[@]}"; do bh rm "$ctr" >/dev/null 2>&1 || true; done
    for dir in "${TEMP_DIRS[@]}"; do rm -rf "$dir"; done
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || die "needs root (buildah with chroot isolation and vfs storage)"
command -v buildah >/dev/null || die "buildah not installed: apt-get install -y buildah"
export BUILDAH_ISOLATION=chroot
mkdir -p "$CACHE"

# ------------------------------------------------------------------ 1. base image
make_base() {
    if [ "$BASE_IMAGE" != "$DEFAULT_BASE" ]; then
        bh inspect --type image "$BASE_IMAGE" >/dev/null 2>&1 || die "base image $BASE_IMAGE not in $CACHE/storage"
        log "base image $BASE_IMAGE (given)"
        return
    fi
    if bh inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE cached"
        return
    fi
    local t0 tar=$CACHE/base/rootfs.tar
    t0=$(now)
    if [ ! -s "$tar" ]; then
        command -v debootstrap >/dev/null || die "debootstrap not installed: apt-get install -y debootstrap"
        log "debootstrap Debian bookworm (minbase) from $MIRROR"
        rm -rf "$CACHE/rootfs.tmp"
        debootstrap --variant=minbase --include=ca-certificates bookworm "$CACHE/rootfs.tmp" "$MIRROR" \
            >"$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log"; die "debootstrap failed"; }
        cat >"$CACHE/rootfs.tmp/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
        rm -rf "$CACHE"/rootfs.tmp/var/cache/apt/archives/*.deb "$CACHE"/rootfs.tmp/var/lib/apt/lists/*
        mkdir -p "$CACHE/base"
        tar --numeric-owner -C "$CACHE/rootfs.tmp" -cf "$tar.tmp" . && mv "$tar.tmp" "$tar"
        rm -rf "$CACHE/rootfs.tmp"
    fi
    printf 'FROM scratch\nADD rootfs.tar /\nCMD ["/bin/bash"]\n' >"$CACHE/base/Containerfile"
    bh bud --isolation chroot --quiet -f "$CACHE/base/Containerfile" -t "$BASE_IMAGE" "$CACHE/base" >/dev/null
    record base_seconds "$(since "$t0")"
}

# ------------------------------------------------------------------ 2. build
build_image() {
    local ctx t0 wheel index_url
    ctx=$(mktemp -d /var/tmp/grazbids-context.XXXXXX)
    TEMP_DIRS+=("$ctx")
    # the working tree as the lead would commit it: tracked and untracked, not ignored
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf -) | tar -C "$ctx" -xf -
    wheel=$(ls "$WHEELS_DIR"/torch-"${TORCH_SPEC#torch==}"+cpu-*.whl 2>/dev/null | head -1 || true)
    if [ -n "$wheel" ] && [ -z "${TORCH_INDEX_URL+x}" ]; then
        mkdir -p "$ctx/wheels" && cp "$wheel" "$ctx/wheels/"
        index_url=""  # PyPI + wheels/: pip picks the local +cpu wheel for torch==X
        log "using local wheel $(basename "$wheel")"
    else
        index_url=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}
    fi
    log "building $IMAGE (context $ctx)"
    t0=$(now)
    # the host's CA bundle, for builds behind a TLS-inspecting proxy (build time only)
    local ca_args=()
    if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
        ca_args=(-v /etc/ssl/certs/ca-certificates.crt:/run/build-ca.crt:ro
                 --build-arg BUILD_CA_BUNDLE=/run/build-ca.crt)
    fi
    bh bud --isolation chroot --layers=false "${ca_args[@]}" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" \
        --build-arg TORCH_SPEC="$TORCH_SPEC" \
        --build-arg TORCH_INDEX_URL="$index_url" \
        --build-arg GRAZBIDS_VERSION="$VERSION" \
        --build-arg CONSTRAINTS_SHA256="$(sha256sum "$REPO/constraints.txt" | cut -c1-64)" \
        --build-arg PIP_INDEX_URL="${PIP_INDEX_URL:-}" \
        --build-arg IMAGE_TAG="${IMAGE_TAG:-grazbids:$VERSION}" \
        --build-arg VCS_REF="$(git -C "$REPO" rev-parse HEAD 2>/dev/null || true)" \
        --build-arg BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        -f "$ctx/Dockerfile" -t "$IMAGE" "$ctx" >"$CACHE/build.log" 2>&1 \
        || { tail -40 "$CACHE/build.log"; die "image build failed (log: $CACHE/build.log)"; }
    record build_seconds "$(since "$t0")"
    # the documented names: `docker run grazbids ...` means grazbids:latest
    bh tag "$IMAGE" localhost/grazbids:latest "localhost/grazbids:$VERSION"
    bh rmi --prune >/dev/null 2>&1 || true  # the builder stage's dangling image
    # size: the unpacked root file system, and gzip -6 of it (about what a registry stores)
    local ctr mnt size packed
    ctr=$(bh from --pull-never --quiet "$IMAGE")
    CONTAINERS+=("$ctr")
    mnt=$(bh mount "$ctr")
    size=$(du -sb "$mnt" | cut -f1)
    packed=$(tar -C "$mnt" -cf - . | gzip -6 | wc -c)
    bh umount "$ctr" >/dev/null
    bh rm "$ctr" >/dev/null
    record image_mb "$((size / 1000000))"
    record image_gzip_mb "$((packed / 1000000))"
    if [ -n "${SAVE_ARCHIVE:-}" ]; then
        rm -f "$SAVE_ARCHIVE"
        bh push --quiet "$IMAGE" "docker-archive:$SAVE_ARCHIVE:grazbids:$VERSION"
        record archive_bytes "$(stat -c %s "$SAVE_ARCHIVE")"
    fi
}

# ------------------------------------------------------------------ 3. run
make_tiny_dataset() { # out_dir: 4 participants (2 f, 2 m), 3 mm images
    "$PYTHON" - "$1" "$REAL_BIDS" <<'EOF'
import csv, json, sys
from pathlib import Path

import nibabel as nb
import numpy as np

out, real = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True)
rows = []
if (real / "participants.tsv").is_file():
    from nilearn.image import resample_img
    with open(real / "participants.tsv") as fh:
        table = list(csv.DictReader(fh, delimiter="\t"))
    chosen = [r for r in table if r["gender"] == "f"][:2] + [r for r in table if r["gender"] == "m"][:2]
    for row in chosen:
        sub = row["participant_id"]
        img = nb.load(real / sub / "anat" / f"{sub}_T1w.nii.gz")
        # same orientation, 3 mm voxels (a 3x3 target: nilearn fits the field of view)
        zooms = img.header.get_zooms()[:3]
        small = resample_img(img, target_affine=img.affine[:3, :3] @ np.diag([3 / z for z in zooms]),
                             interpolation="continuous", force_resample=True, copy_header=True)
        data = np.clip(small.get_fdata(), 0, None).astype(np.int16)
        folder = out / sub / "anat"
        folder.mkdir(parents=True)
        nb.Nifti1Image(data, small.affine).to_filename(folder / f"{sub}_T1w.nii.gz")
        (folder / f"{sub}_T1w.json").write_text(json.dumps({"RepetitionTime": 2.3}))
        rows.append((sub, row["gender"]))
    source = "three-millimetre copies of four participants of OpenNeuro ds002748"
else:  # synthetic: a bright ellipsoid with a darker shell, 3 mm voxels
    shape = (60, 72, 60)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r2 = (grid**2).sum(0)
    for i, gender in enumerate("ffmm"):
        rng = np.random.default_rng(i)
        data = ((r2 < 0.5) * 300 + (r2 < 0.35) * 200 + rng.random(shape) * 20).astype(np.int16)
        sub = f"sub-{i + 1:02d}"
        folder = out / sub / "anat"
        folder.mkdir(parents=True)
        affine = np.diag([3.0, 3.0, 3.0, 1.0])
        affine[:3, 3] = [-90, -126, -72]
        nb.Nifti1Image(data, affine).to_filename(folder / f"{sub}_T1w.nii.gz")
        (folder / f"{sub}_T1w.json").write_text(json.dumps({"RepetitionTime": 2.3}))
        rows.append((sub, gender))
    source = "synthetic images"
(out / "dataset_description.json").write_text(json.dumps(
    {"Name": "grazbids container test", "BIDSVersion": "1.10.0", "License": "CC0"}))
(out / "README").write_text(f"Tiny dataset for the grazbids container test: {source}.\n")
(out / "participants.tsv").write_text(
    "participant_id\tgender\n" + "".join(f"{s}\t{g}\n" for s, g in rows))
(out / "participants.json").write_text(json.dumps({"gender": {"Description": "sex", "Levels": {"f": "female", "m": "male"}}}))
print(" ".join(s for s, _ in rows))
EOF
}

run_image() {
    local run_dir ctr t0 subjects
    bh inspect --type image "$IMAGE" >/dev/null 2>&1 || die "no image $IMAGE: run '$0 build' first"
    run_dir=$(mktemp -d /var/tmp/grazbids-container-run.XXXXXX)
    if [ -n "${KEEP_RUN_DIR:-}" ]; then log "run folder (kept): $run_dir"; else TEMP_DIRS+=("$run_dir"); fi
    subjects=$(make_tiny_dataset "$run_dir/bids")
    log "tiny dataset: $subjects"
    chmod -R a+rX,a-w "$run_dir/bids"  # read-only for everyone, besides the :ro mount
    mkdir -p "$run_dir/out" "$run_dir/work"
    chown "$UID_IN_IMAGE:$UID_IN_IMAGE" "$run_dir/out" "$run_dir/work"

    # image configuration: entrypoint, user, labels, environment
    bh inspect --type image "$IMAGE" | "$PYTHON" -c '
import json, sys
config = json.load(sys.stdin)["OCIv1"]["config"]
expected = {"Entrypoint": ["grazbids"], "Cmd": ["--help"], "User": "grazbids"}
wrong = {k: config.get(k) for k, v in expected.items() if config.get(k) != v}
if config["Labels"].get("org.opencontainers.image.version") != sys.argv[1]:
    wrong["version label"] = config["Labels"].get("org.opencontainers.image.version")
if config["Labels"].get("org.grazbids.python.constraints") != f"constraints.txt sha256:{sys.argv[2]}":
    wrong["constraints label"] = config["Labels"].get("org.grazbids.python.constraints")
sys.exit(f"image configuration: {wrong}" if wrong else 0)' "$VERSION" "$(sha256sum "$REPO/constraints.txt" | cut -c1-64)" \
        || die "unexpected image configuration"
    for name in localhost/grazbids:latest "localhost/grazbids:$VERSION"; do
        bh inspect --type image "$name" >/dev/null 2>&1 || die "the image is not tagged $name"
    done

    ctr=$(bh from --pull-never --quiet "$IMAGE")
    CONTAINERS+=("$ctr")
    # `buildah run` does not apply the entrypoint: prepend it ("grazbids") ourselves. The
    # command runs in a new network namespace without interfaces: no network at run time.
    grazbids_in_image() {
        unshare --net -- buildah --root "$CACHE/storage" --runroot "$CACHE/runroot" --storage-driver vfs \
            run --isolation chroot --user grazbids \
            -v "$run_dir/bids:/bids:ro" -v "$run_dir/out:/out" -v "$run_dir/work:/work" \
            "$ctr" -- grazbids "$@"
    }

    local version
    version=$(grazbids_in_image --version)
    [ "$version" = "grazbids $VERSION" ] || die "--version printed '$version'"
    log "--version: $version"

    grazbids_in_image --boutiques >"$run_dir/boutiques.json"
    "$PYTHON" -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["name"] == "grazbids", d["name"]' \
        "$run_dir/boutiques.json" || die "--boutiques did not print a descriptor"

    # as the non-root user, the image's own files are read-only
    if bh run --isolation chroot --user grazbids "$ctr" -- sh -c 'touch /opt/templateflow/x' 2>/dev/null; then
        die "the non-root user can write into /opt/templateflow"
    fi

    # the pinned versions are the installed ones
    bh run --isolation chroot "$ctr" -- cat /opt/venv/grazbids-pip-freeze.txt >"$run_dir/freeze.txt"
    "$PYTHON" - "$REPO/constraints.txt" "$run_dir/freeze.txt" <<'EOF' || die "installed versions differ from constraints.txt"
import re, sys
def pins(path):
    out = {}
    for line in open(path):
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            out[re.sub(r"[-_.]+", "-", name).lower()] = version.split("+")[0]
    return out
wanted, got = pins(sys.argv[1]), pins(sys.argv[2])
wrong = {k: (v, got[k]) for k, v in wanted.items() if k in got and got[k] != v}
missing = sorted(set(wanted) - set(got))
print(f"pinned: {len(wanted)}, installed: {len(got)}, differing: {wrong}, not installed: {missing}")
sys.exit(1 if wrong else 0)
EOF

    touch "$run_dir/stamp"
    sleep 1

    # the documented call, literally: no -w (the default work folder, /out_work, cannot be
    # created by the image's user: grazbids falls back to /tmp and says so), default resources
    log "participant level (docker run grazbids /bids /out participant)"
    t0=$(now)
    grazbids_in_image /bids /out participant 2>"$run_dir/participant.err" \
        || { tail -20 "$run_dir/participant.err"; die "participant level failed (exit $?)"; }
    grep -q "Work folder: /tmp/grazbids_work_.* (inside the docker container" "$run_dir/participant.err" \
        || die "the participant level did not say where its work folder is"
    record participant_seconds "$(since "$t0")"

    log "group level"
    t0=$(now)
    grazbids_in_image /bids /out group -w /work --nprocs 2 --omp-nthreads 2 \
        --target-column gender --epochs 1 --cv-folds 2 \
        || die "group level failed (exit $?)"
    record group_seconds "$(since "$t0")"

    check_outputs "$run_dir/out" "$subjects"

    # nothing was written into the image outside /tmp and $HOME (matplotlib's font cache, the
    # validator's deno cache), so `docker run --read-only --tmpfs /tmp --tmpfs /home/grazbids`
    # works; buildah itself creates the mount points and /etc/{hosts,hostname,resolv.conf}
    local mnt written
    mnt=$(bh mount "$ctr")
    written=$(cd "$mnt" && find . -xdev -newer "$run_dir/stamp" \
        -not -path './tmp' -not -path './tmp/*' -not -path './home/grazbids' \
        -not -path './home/grazbids/*' -not -path './bids' -not -path './out' \
        -not -path './work' -not -path './etc/hosts' -not -path './etc/hostname' \
        -not -path './etc/resolv.conf' -not -path './run' -not -path './run/*' -not -path '.' \
        | head -20)
    bh umount "$ctr" >/dev/null
    [ -z "$written" ] || die "the runs wrote into the image outside /tmp and /home/grazbids: $written"
    record run_ok 1
}

check_outputs() { # out_dir subjects
    "$PYTHON" - "$1" "$2" "$UID_IN_IMAGE" "$VERSION" <<'EOF'
import json, sys
from pathlib import Path

out, subjects, uid, version = Path(sys.argv[1]), sys.argv[2].split(), int(sys.argv[3]), sys.argv[4]
problems = []
desc = json.loads((out / "dataset_description.json").read_text())
generated = desc["GeneratedBy"][0]
if generated.get("Container") != {"Type": "docker", "Tag": f"grazbids:{version}"}:
    problems.append(f"GeneratedBy.Container is {generated.get('Container')}")
if generated.get("Version") != version:
    problems.append(f"GeneratedBy.Version is {generated.get('Version')}")
for sub in subjects:
    for tail in ("desc-preproc_T1w.nii.gz", "desc-brain_mask.nii.gz"):
        found = list((out / sub / "anat").glob(f"{sub}_space-MNI152NLin2009aSym_res-2_{tail}"))
        if not found:
            problems.append(f"missing {sub}/anat/{sub}_space-MNI152NLin2009aSym_res-2_{tail}")
group = out / "group" / "mode-grazplus"
for name in ("cv_metrics.tsv", "oof_predictions.tsv"):
    if not (group / name).is_file():
        problems.append(f"missing group/mode-grazplus/{name}")
owners = {p.stat().st_uid for p in out.rglob("*")}
if owners != {uid}:
    problems.append(f"outputs owned by uids {owners}, expected only {uid} (the image's user)")
if problems:
    print("\n".join(problems))
    sys.exit(1)
print(f"outputs ok: {sum(1 for p in out.rglob('*') if p.is_file())} files")
EOF
}

case "$STEP" in
    base) make_base ;;
    build) make_base; build_image ;;
    run) run_image ;;
    all) make_base; build_image; run_image ;;
    *) die "unknown step '$STEP' (all, base, build, run)" ;;
esac
log "done ($STEP); measurements in $RESULTS"
