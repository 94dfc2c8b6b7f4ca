#!/usr/bin/env bash
# The wheel as a user gets it: installed into a fresh venv outside the checkout with the newest dependencies
# the ranges allow (torch held at its CPU build), the installed package made read-only, and used from another
# folder. Usage: tools/wheel_smoke.sh DIST UV FIND_LINKS TORCH_OVERRIDE (the Makefile's wheel-smoke passes them).
set -euo pipefail
dist=$(realpath "$1"); uv=$(realpath "$2"); find_links=$3; torch=$(realpath "$4")
here=$(cd "$(dirname "$0")/.." && pwd)
wheel=$(ls "$dist"/mechintro-*.whl)
sdist=$(ls "$dist"/mechintro-*.tar.gz)
size_mb() { python3 -c "import os,sys; print(f'{os.path.getsize(sys.argv[1]) / 2**20:.1f}')" "$1"; }
echo "wheel: $(basename "$wheel") ($(size_mb "$wheel") MB); sdist: $(basename "$sdist") ($(size_mb "$sdist") MB)"
python3 - "$wheel" <<'EOF'
import os, sys, zipfile
path = sys.argv[1]
assert os.path.getsize(path) < 100 * 2**20, "the wheel is over the package registry's 100 MB default limit"
names = set(zipfile.ZipFile(path).namelist())
for need in ("mechintro/data/stimuli.json", "mechintro/data/organism/model.safetensors",
             "mechintro/data/organism-base/model.safetensors", "mechintro/data/organism/tokenizer.json",
             "mechintro/data/organism/mechintro_spec.json", "mechintro/data/organism_split.json",
             "mechintro/data/organism_report.json", "mechintro/data/paper_metrics/fig1_metrics_cache.parquet"):
    assert need in names, f"the wheel lacks {need}"
assert any(n.startswith("mechintro/data/organism/transcoders/layer_") for n in names), "no transcoders"
print(f"the wheel holds the package data ({len(names)} files)")
EOF

work=$(mktemp -d /tmp/mechintro-wheel-XXXXXX)
chmod 755 "$work"
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
"$uv" pip install -q --python "$work/venv/bin/python" --find-links "$find_links" --override "$torch" "$wheel"
"$work/venv/bin/python" -I -c "import transformers, transformer_lens, sae_lens, torch; print('installed: mechintro with torch', torch.__version__, '| transformers', transformers.__version__, '| transformer-lens', __import__('importlib.metadata').metadata.version('transformer-lens'), '| sae-lens', sae_lens.__version__)"
pkg=$("$work/venv/bin/python" -I -c "import mechintro, os; print(os.path.dirname(mechintro.__file__))")
case "$pkg" in "$here"*) echo "mechintro was imported from the checkout ($pkg), not the wheel"; exit 1;; esac
# Compile the bytecode now, then no write into the package can succeed: read-only for everyone, and, when
# this runs as root (which ignores permission bits), a read-only bind mount in a private mount namespace.
"$work/venv/bin/python" -I -m compileall -q "$pkg" >/dev/null
chmod -R a-w "$pkg"
mkdir "$work/elsewhere" "$work/home"
cp "$here/tools/wheel_smoke.py" "$work/wheel_smoke.py"
cat >"$work/smoke.sh" <<SMOKE
set -euo pipefail
if [ "\$(id -u)" = 0 ]; then mount --bind "$pkg" "$pkg" && mount -o remount,ro,bind "$pkg"; fi
if touch "$pkg/written" 2>/dev/null; then echo "the installed package is still writable"; exit 1; fi
cd "$work/elsewhere"
mechintro --help >/dev/null && echo "mechintro --help: ok"
mechintro demo >demo.log 2>&1 || { cat demo.log; exit 1; }
echo "mechintro demo: ok (\$(wc -l <demo.log) lines)"
python "$work/wheel_smoke.py"
SMOKE
run=(bash "$work/smoke.sh")
if [ "$(id -u)" = 0 ]; then run=(unshare -m "${run[@]}"); fi
env -i PATH="$work/venv/bin:/usr/bin:/bin" HOME="$work/home" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    MECHINTRO_BROWSER=none "${run[@]}"
echo "wheel smoke passed: installed from $(basename "$wheel"), used read-only from another folder"
