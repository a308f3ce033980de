#!/usr/bin/env bash
# Slurm batch job: idmr_jax training/evaluation on GPU nodes, one JAX process per node.
#
#   WORKDIR=/shared/runs/oacir CONFIG=configs/oacir.py sbatch launch/gpu_slurm.sh [idmr_jax.main flags...]
#   DRY_RUN=1 bash launch/gpu_slurm.sh ...   # inside an allocation (or with SLURM_* set): print, do not run
#
# Settings come from the environment (sbatch passes the submitting shell's environment on):
#   WORKDIR (required)   checkpoints and results; every node must see it: a shared filesystem or gs://
#   CONFIG               default configs/oacir.py (FILE[:ARGS])
#   IDMR_VENV            the venv to create/use, default <repo>/.venv-cuda (on a shared filesystem: it is
#                        installed once, from the first node, and used by every node)
#   IDMR_SKIP_INSTALL=1  use IDMR_VENV as it is
#   JAX_COORDINATOR_PORT default 20000 + SLURM_JOB_ID % 10000, so two jobs sharing a node do not collide
#   DRY_RUN=1            print the environment and the srun command instead of installing and running
# Arguments to this script are appended to `python -m idmr_jax.main`, e.g. --config.train.num_steps=1000.
#
# Processes: one per node (--ntasks-per-node=1) that drives all of that node's GPUs. This is JAX's model on
# TPU hosts too: one process per host, the mesh spans the local devices of every process, the input pipeline
# is sharded by process (fewer, larger per-process batches) and only one process per node compiles.
# One process per GPU also works: set --ntasks-per-node to the GPUs per node (and --cpus-per-task to the
# node's cores divided by it); each task then gets JAX_LOCAL_DEVICE_IDS=SLURM_LOCALID, unless Slurm has
# already bound one GPU to each task through CUDA_VISIBLE_DEVICES.
#
#SBATCH --job-name=idmr
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"

die() { echo "gpu_slurm.sh: error: $*" >&2; exit 2; }

# Quotes one word for a POSIX shell: as is when it only has safe characters, else in single quotes.
shquote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}
shjoin() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(shquote "$a")"; done
  printf '%s' "$out"
}

# The repository: sbatch runs a copy of this script from Slurm's spool directory, so its own location is
# only right when it is run with bash; under sbatch the job starts in the submission directory.
ROOT="${IDMR_ROOT:-}"
if [[ -z $ROOT ]]; then
  for cand in "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" "${SLURM_SUBMIT_DIR:-}"; do
    if [[ -n $cand && -f $cand/idmr_jax/main.py ]]; then ROOT=$cand; break; fi
  done
fi
[[ -n $ROOT ]] || die "cannot find the idmr_jax checkout; submit from its root or set IDMR_ROOT"

CONFIG="${CONFIG:-configs/oacir.py}"
[[ -n ${WORKDIR:-} ]] || die "set WORKDIR (a directory every node sees: shared filesystem or gs://)"
for v in SLURM_JOB_ID SLURM_JOB_NODELIST SLURM_JOB_NUM_NODES; do
  [[ -n ${!v:-} ]] || die "$v is not set: run this inside a Slurm allocation (sbatch launch/gpu_slurm.sh)"
done
VENV="${IDMR_VENV:-$ROOT/.venv-cuda}"

# ------------------------------------------------------------------------------------------ environment
# jax.distributed (read by idmr_jax.runtime): the coordinator is the job's first node; the process count is
# the step's task count. JAX_PROCESS_ID differs per task, so it is set inside srun from SLURM_PROCID below.
# (All of scontrol's output is read, not piped into head: head would close the pipe early, scontrol could die
# of SIGPIPE on a long node list, and pipefail would turn that into a failure.)
nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST") || die "scontrol show hostnames '$SLURM_JOB_NODELIST' failed"
first_node=${nodes%%$'\n'*}
[[ -n $first_node ]] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' printed no host"
num_nodes=$SLURM_JOB_NUM_NODES
num_procs="${SLURM_NTASKS:-$((num_nodes * ${SLURM_NTASKS_PER_NODE:-1}))}"
((num_procs % num_nodes == 0)) || die "SLURM_NTASKS=$num_procs is not a multiple of the $num_nodes nodes"
export JAX_COORDINATOR_ADDRESS="$first_node:${JAX_COORDINATOR_PORT:-$((20000 + SLURM_JOB_ID % 10000))}"
export JAX_NUM_PROCESSES="$num_procs"
export IDMR_PROCS_PER_NODE=$((num_procs / num_nodes))

# XLA GPU compiler flags (any XLA_FLAGS already set come after these, so they win):
xla_flags=(
  # Schedules collectives asynchronously around independent compute: the FSDP weight all-gathers and the
  # gradient reduce-scatter/all-reduce of the data axis overlap with the matmuls instead of stalling them.
  # Off by default on GPU.
  --xla_gpu_enable_latency_hiding_scheduler=true
  # With model.vision.scan the ViT's layers are one while loop; this moves the all-gather of the next layer's
  # fsdp-sharded weights into the previous iteration, where the scheduler above can hide it. (Pipelined
  # reduce-scatter, its counterpart in the backward pass, is already on by default.)
  --xla_gpu_enable_pipelined_all_gather=true
)
# Not set on purpose: --xla_gpu_enable_triton_gemm=false, once advised to force cuBLAS. XLA now autotunes its
# Triton GEMM fusions against cuBLAS (--xla_gpu_cublas_fallback, on by default) and keeps the faster one.
export XLA_FLAGS="${xla_flags[*]}${XLA_FLAGS:+ $XLA_FLAGS}"
# JAX preallocates 75% of each GPU by default; BLIP-2's ViT-g wants more. The remaining 10% is for what is
# allocated outside XLA's pool: NCCL's communicator buffers and the cuBLAS/cuDNN workspaces.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
# NCCL prints why it failed (a wrong network interface, a missing InfiniBand device) instead of only hanging
# or erroring in XLA. Interface/HCA choices (NCCL_SOCKET_IFNAME, NCCL_IB_HCA) are site-specific: set them in
# the environment you submit from when your cluster's documentation asks for them.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

# ---------------------------------------------------------------------------------------------- install
# The `cuda` extra (jax[cuda12], pinned); a stamp makes it a no-op while pyproject.toml is unchanged. A
# separate venv from the CPU development one in .venv.
install_cmds=(
  "[ -x $(shquote "$VENV/bin/python") ] || python3.11 -m venv $(shquote "$VENV")"
  "$(shjoin "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "${ROOT}[cuda]")"
)
if [[ ${IDMR_SKIP_INSTALL:-0} != 1 && $DRY_RUN != 1 ]]; then
  stamp="$VENV/.idmr_installed"
  want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)-cuda"
  if [[ ! -f $stamp || "$(cat "$stamp")" != "$want" ]]; then
    for c in "${install_cmds[@]}"; do bash -c "set -e; $c"; done
    echo "$want" > "$stamp"
  fi
fi

# ---------------------------------------------------------------------------------------------- launch
# Each task sets its own process id (and, with several processes per node, its GPU), then becomes python.
# shellcheck disable=SC2016  # these $ are for the task's shell, not this one
task='export JAX_PROCESS_ID="$SLURM_PROCID"; '\
'if [ "$IDMR_PROCS_PER_NODE" -gt 1 ] && [ "${CUDA_VISIBLE_DEVICES:-,}" != "${CUDA_VISIBLE_DEVICES#*,}" ]; then '\
'export JAX_LOCAL_DEVICE_IDS="$SLURM_LOCALID"; fi; exec "$@"'
cpus="${SLURM_CPUS_PER_TASK:-}"
srun_cmd=(srun --nodes="$num_nodes" --ntasks="$num_procs" --ntasks-per-node="$IDMR_PROCS_PER_NODE"
  --kill-on-bad-exit=1 --label)
# Since Slurm 22.05 srun does not inherit --cpus-per-task from sbatch; without it each task may get one core.
[[ -z $cpus ]] || srun_cmd+=(--cpus-per-task="$cpus")
srun_cmd+=(bash -c "$task" idmr_task "$VENV/bin/python" -m idmr_jax.main --config="$CONFIG" --workdir="$WORKDIR"
  "$@")

cd "$ROOT"
if [[ $DRY_RUN == 1 ]]; then
  echo "# dry run: job $SLURM_JOB_ID, $num_nodes node(s), $num_procs process(es), coordinator on $first_node"
  echo "# install (skipped in a dry run; a no-op when up to date):"
  for c in "${install_cmds[@]}"; do echo "#   $c"; done
  for v in JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES IDMR_PROCS_PER_NODE XLA_FLAGS \
    XLA_PYTHON_CLIENT_MEM_FRACTION NCCL_DEBUG; do
    echo "export $v=$(shquote "${!v}")"
  done
  echo "cd $(shquote "$ROOT")"
  shjoin "${srun_cmd[@]}"; echo
  exit 0
fi
echo "job $SLURM_JOB_ID: $num_procs process(es) on $num_nodes node(s), coordinator $JAX_COORDINATOR_ADDRESS" >&2
exec "${srun_cmd[@]}"
