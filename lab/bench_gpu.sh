#!/usr/bin/env bash
# One-shot GPU benchmark of guided vs vanilla generation (python -m lab.bench --device cuda --parts generation):
# SD1.5 shapes in fp16, batch 8 with classifier-free guidance (16 UNet rows), 512 px (h is 1280x8x8), 20 DDIM steps,
# and the committed toy model (batch 64, 25 steps). Every arm is warmed up, one untimed call per arm counts its
# host-device synchronisations (HostSyncCounter and torch.cuda.set_sync_debug_mode), then 5 timed rounds alternate
# the order of the arms; peak memory from torch.cuda.max_memory_allocated.
#
#   lab/bench_gpu.sh [OUTPUT_DIR] [extra lab.bench flags...]   (default OUTPUT_DIR: docs/lab/bench/gpu)
#   PYTHON=/path/to/python lab/bench_gpu.sh                   (default: python3, with a CUDA build of torch)
#   lab/bench_gpu.sh --pack-wheels                            (see below; run where the deps are installed)
#
# Packages the GPU machine lacks (e.g. diffusers next to its torch, transformers and accelerate) travel as wheels:
# every .whl/*.whl at the repository root is installed first (pip --no-index --no-deps into a temporary folder put
# on PYTHONPATH; nothing is downloaded). `--pack-wheels` writes them, without a network, from the packages installed
# for $PYTHON here (pure-Python ones; default: diffusers; PACK="name ..." for others) into .whl/ (git-ignored).
# No weights are downloaded either (random SD1.5-shaped weights; the toy model is committed). A few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if [[ "${1:-}" == "--pack-wheels" ]]; then
    mkdir -p .whl
    # shellcheck disable=SC2086
    "$PYTHON" - .whl ${PACK:-diffusers} <<'EOF'
"""A wheel of each named distribution, rebuilt from its installed files (pure-Python distributions only)."""
import base64
import hashlib
import importlib.metadata as metadata
import sys
import zipfile
from pathlib import Path

out = Path(sys.argv[1])
for name in sys.argv[2:]:
    dist = metadata.distribution(name)
    files = [f for f in dist.files or [] if not str(f).startswith("..") and "__pycache__" not in f.parts]
    info_dir = next(f.parts[0] for f in files if f.parts[0].endswith(".dist-info"))
    wheel_meta = dist.read_text("WHEEL") or ""
    if "Root-Is-Purelib: true" not in wheel_meta or "py3-none-any" not in wheel_meta:
        sys.exit(f"bench_gpu.sh --pack-wheels: {name} is not a pure-Python (py3-none-any) wheel; pip download it")
    skip = {f"{info_dir}/{n}" for n in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")}
    wheel = out / f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}-py3-none-any.whl"
    records = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for f in files:
            if f.as_posix() in skip or f.suffix == ".pyc":
                continue
            data = Path(dist.locate_file(f)).read_bytes()
            archive.writestr(f.as_posix(), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{f.as_posix()},sha256={digest},{len(data)}")
        records.append(f"{info_dir}/RECORD,,")
        archive.writestr(f"{info_dir}/RECORD", "\n".join(records) + "\n")
    print(f"{wheel} ({wheel.stat().st_size / 2**20:.1f} MiB)")
EOF
    exit 0
fi

OUTPUT_DIR="${1:-docs/lab/bench/gpu}"
shift || true

if compgen -G ".whl/*.whl" > /dev/null; then
    SITE="$(mktemp -d /tmp/bench-gpu-site.XXXXXX)"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "bench_gpu.sh: CUDA is not available to " + sys.executable)'
"$PYTHON" -c 'import diffusers, transformers' || {
    echo "bench_gpu.sh: $PYTHON cannot import diffusers/transformers: put their wheels in .whl/ (lab/bench_gpu.sh --pack-wheels where they are installed)" >&2
    exit 1
}
mkdir -p "$OUTPUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUTPUT_DIR/nvidia-smi.csv" 2>&1 || true
"$PYTHON" -m lab.bench --device cuda --dtype float16 --parts generation --scales toy,sd15 \
    --sd15-batch 8 --sd15-steps 20 --sd15-rounds 5 --sd15-warmup 1 --toy-rounds 5 \
    --output-dir "$OUTPUT_DIR" "$@"
