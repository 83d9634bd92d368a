#!/usr/bin/env bash
# The GPU check, every device measurement of the project in one run (sized for under 5 minutes on one GPU; not yet
# timed on one). Tables printed and written under studies/*/results/:
#   1. python -m studies.gpu_check: seconds per Lightning step of FewShotClassifier for fo, t1t2, greedy(0.99) and
#      rmd at T = 10 and 50, the tasks batched (one backbone call, batch norm per task: the default on a GPU) and
#      one by one, the peak CUDA memory of each, and the GPU's hypergradient against the CPU's (float32, float64);
#   2. the cost study's few-shot problem: fused against streamed Greedy beside T1-T2 and FO, one by one and batched;
#   3. python -m studies.cost.launches --device cuda: launch counts and times of the three paths;
#   4. python -m studies.peers --device cuda: the peers side by side (after scripts/install_peers.sh);
#   5. python -m studies.scale --device cuda: peak CUDA memory and seconds of one hypergradient against T (10, 100,
#      1000) on the horizon study's CNN for rmd (plain, sqrt- and auto-checkpointed), mixed_rmd (plain, checkpointed with
#      each product: whether forward-over-reverse wins on a GPU), higher and TorchOpt.
# Options go to part 1 (python -m studies.gpu_check --help lists them):
#     bash scripts/gpu_check.sh --steps 3 --rounds 2
#     bash scripts/gpu_check.sh --device cpu --dataset digits --steps 1 --rounds 1 --inner-steps 2   # part 1 alone, no GPU
# Installs nothing beyond the README's install command and the peers (into .peers/), and runs the install only when
# the environment ($VENV, default .venv) is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || bash scripts/install.sh
"$VENV/bin/python" -m studies.gpu_check "$@"
case " $* " in *" --device cpu "*) exit 0 ;; esac
"$VENV/bin/python" -m studies.cost.estimators --device cuda --problems fewshot fewshot_batched --inner-steps 50 200 \
    --repeats 5 --estimators fo t1t2 "greedy(0.99)" "greedy(0.99, fused=False)" \
    --json studies/cost/results/fused_greedy_cuda.json
"$VENV/bin/python" -m studies.cost.launches --device cuda --rounds 3
[ -d .peers ] || PYTHON="$VENV/bin/python" bash scripts/install_peers.sh || echo "note: the peers did not install; part 4 leaves them out"
"$VENV/bin/python" -m studies.peers --device cuda --rounds 3
"$VENV/bin/python" -m studies.scale run --device cuda --out studies/scale/results_cuda --steps 10 100 1000 \
    --sublinear-steps --repeats 1 --max-seconds 60
