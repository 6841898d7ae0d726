#!/bin/bash
# Does PRN gain from the base model's maps of its own train places? prn_tiny_rgb continued
# from prn_rgb_all3 on the maps of the 320 train places of the four labelled sets beside the
# 146 val places it trained on, early-stopped on the same 49 held-out val places (recorded in
# prn_rgb_all3's header). RESULTS.md (point 4, 2026-12-04) has what it printed.
#   bash benchmarks/research/prn_on_train_places.sh OUT.safetensors [MINUTES]
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:?give the output checkpoint}
lists=$(mktemp -d)
python - "$lists" <<'EOF'
import sys
from pathlib import Path

from geoprn.data import discover_pairs
from geoprn.models.checkpoint import read_header

data, lists = Path("../shared/data"), Path(sys.argv[1])
sets = ("massachusetts", "massachusetts_crops", "cil_roads", "cil2022")
held = set(read_header("geoprn/weights/prn_rgb_all3.safetensors")["trained_on"]["val_tiles"])
val = discover_pairs([data / s / "val" for s in sets])
train = discover_pairs([data / s / "train" for s in sets]) + [p for p in val if p.name not in held]
(lists / "tiles").write_text("".join(f"{p.image},{p.label}\n" for p in train))
(lists / "val").write_text("".join(f"--val\n{p.image},{p.label}\n" for p in val if p.name in held))
EOF
OMP_NUM_THREADS=2 geoprn -v train prn $(cat "$lists/tiles") $(cat "$lists/val") \
  --base geoprn/weights/base_all_sets_3.safetensors --config prn_tiny_rgb --seed 0 \
  --init geoprn/weights/prn_rgb_all3.safetensors --lr 4e-4 \
  --device cpu --max-minutes "${2:-60}" -o "$out"
