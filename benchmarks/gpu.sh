#!/usr/bin/env bash
# The GPU figures in one run: caching (SmolLM2-135M + LoRA, and every weight with the Kronecker sketch against
# RapidGrad), and retrieval (scan GB/s against the device's own measured copy bandwidth), written to one JSON.
#
#   bash benchmarks/gpu.sh [OUT_DIR]          # default .rapidin/gpu; needs a CUDA torch (README: "GPU.")
#
# Refuses to start without CUDA, so a CPU number is never published as a GPU one.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-.rapidin/gpu}"
PY="${PY:-.venv/bin/python}"
DEVICE="${DEVICE:-cuda}"
mkdir -p "$OUT"
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu.sh: torch sees no CUDA device (torch ' + torch.__version__ + ')')"
make smollm2 >/dev/null
"$PY" benchmarks/speed.py --sections caching,retrieval --device "$DEVICE" --examples 64 --rows 32768 \
    --out "$OUT/speed.json" --markdown "$OUT/speed.md"
"$PY" benchmarks/speed_kronecker.py --models smollm2 --rows 32 --device "$DEVICE" --out "$OUT/kronecker.json"
"$PY" - "$OUT" <<'PY'
import json, subprocess, sys
from pathlib import Path
import torch

out = Path(sys.argv[1])
speed = json.loads((out / "speed.json").read_text())
kron = json.loads((out / "kronecker.json").read_text())
caching = {r["model"]: r for r in speed.get("caching", []) if isinstance(r, dict) and "model" in r}
big = speed["retrieval"]["sizes"][0]
summary = {
    "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
    "nvidia_smi": subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip(),
    "caching": caching,
    "full_parameter": kron,
    "retrieval": {"cache_gb": big["cache_gb"], "device_copy_gb_per_s": big["anchors"]["memcpy_gb_per_s"],
                  "scan": [{k: r[k] for k in ("queries", "verify", "gb_per_s")} for r in big["scan"]["runs"]]},
}
(out / "gpu.json").write_text(json.dumps(summary, indent=1))
print(f"wrote {out / 'gpu.json'}")
PY
