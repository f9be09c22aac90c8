#!/usr/bin/env bash
# The offline scripts on the v5 offline suite (benchmarks/offline_suite.py), through benchmarks/reproduce.py: runs
# resume where they stopped, so repeat a command until every run is done. One run at a time, on one torch thread
# (`--workers 2` on a 2-core machine), so that the other core stays free for another lane.
# The sets: $SUITE/TASK-SET-v0.npz (default ~/offline_v5); run folders under $OUT (default ~/campaign), outside the
# work tree; commit each finished run's text (log.txt, evaluations.csv, final_evaluation.csv, done.json) and the
# tables under benchmarks/results/.
# Usage: bash benchmarks/offline_v5.sh dt|dd-sweep|dd [SET ...]
#   dt        the Decision Transformer at the paper's gym configuration (the script's defaults: 100k steps of batch
#             64, K = 20, 128 dims, 3 layers, 1 head), 10 episodes per target every 10k steps, then the final model
#             over 100 per target; beside it d3rlpy's DT with the same settings where D3RLPY_PYTHON is set
#             (benchmarks/requirements-d3rlpy.txt in an environment of its own)
#   dd-sweep  the Decision Diffuser's CPU configuration: horizon 4, 8, 16 x U-Net width 32, 64 on hopper-medium
#             (or the HORIZONxWIDTH pairs of $SWEEP_CONFIGS, e.g. "4x32 8x32"), $SWEEP_STEPS steps each (default 10000),
#             evaluated every $SWEEP_EVAL_EVERY steps (default half the run), in $OUT/dd_sweep_$SWEEP_STEPS/
#   dd        the Decision Diffuser at the CPU configuration the sweep chose (RESULTS.md): horizon 4, U-Net width 32,
#             200k steps (about 1 h 45 min on one thread of a 2-core AMD EPYC with AVX-512), 10 episodes every 10k
#             steps, then the final model over 100; DD_FLAGS and DD_STEPS override it
# SET defaults to the issue's order: the medium sets, the medium-replay sets, the medium-expert sets, then expert.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: bash benchmarks/offline_v5.sh dt|dd-sweep|dd [SET ...]}
shift
suite=${SUITE:-~/offline_v5}
out=${OUT:-~/campaign}
sets=("$@")
if [[ ${#sets[@]} == 0 && $what == dd-sweep ]]; then
  sets=(hopper-medium)
elif [[ ${#sets[@]} == 0 ]]; then
  for kind in medium medium-replay medium-expert expert; do
    for task in hopper halfcheetah walker2d; do sets+=("$task-$kind"); done
  done
fi
export OMP_NUM_THREADS=1

# A small U-Net (dim_mults 1 2), 20 diffusion steps, DDIM with 10 at evaluation, the released CDF normaliser, batch 64
# at lr 1e-3 (the HalfCheetah replay configuration of RESULTS.md); the sweep varies horizon and width.
dd_common=(--dim-mults 1 2 --n-diffusion-steps 20 --batch-size 64 --gradient-accumulate-every 1 --ema-start 500
  --learning-rate 1e-3 --normalizer cdf --sampler ddim --sampling-steps 10 --eval-episodes 10 --log-every 2000)
DD_FLAGS=(${DD_FLAGS:---horizon 4 --dim 32 --eval-every 10000})
DD_STEPS=${DD_STEPS:-200000}
SWEEP_STEPS=${SWEEP_STEPS:-10000}
SWEEP_EVAL_EVERY=${SWEEP_EVAL_EVERY:-$((SWEEP_STEPS / 2))}
SWEEP_CONFIGS=${SWEEP_CONFIGS:-4x32 4x64 8x32 8x64 16x32 16x64}

for set in "${sets[@]}"; do
  data=$suite/$set-v0.npz
  [[ -f $data ]] || { echo "offline_v5.sh: no $data (make it with benchmarks/offline_suite.py)"; exit 1; }
  case $what in
    dt)
      scripts=(decision_transformer.py)
      [[ -n ${D3RLPY_PYTHON:-} ]] && scripts+=(d3rlpy_dt)
      for script in "${scripts[@]}"; do  # one at a time; then one table for both
        python benchmarks/reproduce.py --scripts "$script" --datasets "$data" --seeds 1 --total-timesteps 100000 \
          --final-eval-episodes 100 --workers 2 --output-dir "$out/offline_dt" -- --eval-episodes 10
      done
      python benchmarks/reproduce.py --scripts "${scripts[@]}" --datasets "$data" --seeds 1 \
        --total-timesteps 100000 --output-dir "$out/offline_dt" --aggregate-only ;;
    dd-sweep)
      for config in $SWEEP_CONFIGS; do
        horizon=${config%x*} dim=${config#*x}
        python benchmarks/reproduce.py --scripts decision_diffuser.py --datasets "$data" --seeds 1 \
          --total-timesteps "$SWEEP_STEPS" --workers 2 --output-dir "$out/dd_sweep_$SWEEP_STEPS/h${horizon}_dim${dim}" \
          -- "${dd_common[@]}" --horizon "$horizon" --dim "$dim" --eval-every "$SWEEP_EVAL_EVERY"
      done ;;
    dd)
      python benchmarks/reproduce.py --scripts decision_diffuser.py --datasets "$data" --seeds 1 \
        --total-timesteps "$DD_STEPS" --final-eval-episodes 100 --workers 2 --output-dir "$out/offline_dd" \
        -- "${dd_common[@]}" "${DD_FLAGS[@]}" ;;
    *) echo "offline_v5.sh: unknown mode $what (dt, dd-sweep or dd)"; exit 1 ;;
  esac
done
