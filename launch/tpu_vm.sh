#!/usr/bin/env bash
# Creates, sets up, runs on, tails and deletes a Cloud TPU VM (single host or pod slice) with gcloud.
# Run with --help for the usage; see launch/README.md. With --dry-run every gcloud command is printed, one per
# line and quoted so that it can be pasted into a shell, instead of being run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GCLOUD="${GCLOUD:-gcloud}"   # overridable so that the tests can put a fake gcloud in its place

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh [--dry-run] COMMAND --name NAME --zone ZONE [options] [-- MAIN_FLAGS...]

Commands (every remote command runs on all workers of the slice unless --worker says otherwise):
  create   create the TPU VM (works for single hosts and pod slices)
  setup    copy the local checkout (default) or git-clone --repo onto every worker, then create a Python 3.11
           venv there and pip install -e '.[tpu]' (jax[tpu] pinned by pyproject.toml)
  run      start `python -m idmr_jax.main --config=... --workdir=...` in the background (nohup) on every
           worker, logging to ~/idmr_jax_logs/run-$(hostname).log on each worker
  logs     print the tail of the run log of every worker (or of one with --worker N)
  stop     stop the run started by `run` (the process recorded in its pid file) on every worker
  delete   delete the TPU VM (no prompt)

Required:
  --name NAME                 TPU VM name
  --zone ZONE                 e.g. us-central2-b
  --accelerator-type TYPE     e.g. v4-8, v4-16, v5litepod-16, v5p-32, v6e-8 (required for create and run)

Options:
  --project P                 GCP project (default: gcloud's configured project)
  --version RUNTIME           TPU runtime version for create (default by generation: v4 and older
                              tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
                              v6e v2-alpha-tpuv6e)
  --spot                      create a Spot TPU VM
  --copy                      setup: scp the local checkout to the workers (the default)
  --repo URL [--branch REF]   setup: git clone URL (at REF) on every worker instead of copying
  --config FILE[:ARGS]        run: the config, e.g. configs/oacir.py or configs/oacir.py:paper
  --workdir DIR               run: checkpoints, metrics and results; must be gs://... on a multi-host slice
                              (default: gs://$IDMR_GCS_BUCKET/idmr_jax/NAME when IDMR_GCS_BUCKET is set)
  --extra-flags "..."         run: more idmr_jax.main flags, split on whitespace
                              (e.g. "--config.train.num_steps=1000"); flags after `--` are passed as they are
  --worker N|all              logs: which worker (default all)
  --lines N                   logs: how many lines (default 100)
  --follow                    logs: keep following the logs (Ctrl-C to stop)
  --remote-dir NAME           code directory under the remote home (default idmr_jax); the venv and logs go to
                              NAME_venv and NAME_logs beside it
  --dry-run                   print the gcloud commands instead of running them
  -h, --help                  this text

Example:
  launch/tpu_vm.sh create --name rt --zone us-central2-b --accelerator-type v4-16
  launch/tpu_vm.sh setup  --name rt --zone us-central2-b --accelerator-type v4-16
  launch/tpu_vm.sh run    --name rt --zone us-central2-b --accelerator-type v4-16 \
      --config configs/oacir.py --workdir gs://BUCKET/oacir -- --config.data.train_dir=gs://BUCKET/train
  launch/tpu_vm.sh logs   --name rt --zone us-central2-b --worker 0 --follow
  launch/tpu_vm.sh delete --name rt --zone us-central2-b
EOF
}

die() {  # error message, the short usage, exit status 2
  echo "tpu_vm.sh: error: $*" >&2
  echo "Usage: launch/tpu_vm.sh [--dry-run] {create,setup,run,logs,stop,delete} --name NAME --zone ZONE" \
    "[--accelerator-type TYPE] [options]; see launch/tpu_vm.sh --help" >&2
  exit 2
}

# Quotes one word for a POSIX shell: as is when it only has safe characters, else in single quotes.
shquote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Quotes every argument and joins them with spaces: one shell command line.
shjoin() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(shquote "$a")"; done
  printf '%s' "$out"
}

# Prints (dry run) or runs one command given as an argument vector.
run_cmd() {
  if [[ $DRY_RUN == 1 ]]; then
    shjoin "$@"; echo
  else
    echo "+ $(shjoin "$@")" >&2
    "$@"
  fi
}

# Number of hosts (workers) of an accelerator type, or nothing when the type is not recognised.
# v2/v3/v4/v5p count TensorCores (8 per host); v5e (v5litepod) and v6e count chips: up to 8 on one host,
# 4 per host in multi-host slices.
hosts_for_type() {
  local t=$1 gen n
  [[ $t =~ ^(v[0-9]+[a-z]*)-([0-9]+)$ ]] || return 0
  gen=${BASH_REMATCH[1]}
  n=$((10#${BASH_REMATCH[2]}))
  case $gen in
    v2 | v3 | v4 | v5p) echo $((n <= 8 ? 1 : n / 8)) ;;
    v5litepod | v5e | v6e) echo $((n <= 8 ? 1 : n / 4)) ;;
  esac
}

default_version() {
  case ${1%%-*} in
    v5litepod | v5e) echo v2-alpha-tpuv5-lite ;;
    v5p) echo v2-alpha-tpuv5 ;;
    v6e) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

# ---------------------------------------------------------------------------------------------- arguments
DRY_RUN=0 CMD="" NAME="" ZONE="" TYPE="" PROJECT="" VERSION="" SPOT=0 REPO="" BRANCH="" MODE=copy
CONFIG="" WORKDIR="" EXTRA="" WORKER=all LINES=100 FOLLOW=0 REMOTE_DIR=idmr_jax
PASS=()
need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  arg=$1
  if [[ $arg == --*=* ]]; then  # --flag=value -> --flag value
    set -- "${arg%%=*}" "${arg#*=}" "${@:2}"
    arg=$1
  fi
  case $arg in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --spot) SPOT=1; shift ;;
    --copy) MODE=copy; shift ;;
    --follow) FOLLOW=1; shift ;;
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --accelerator-type) need_value "$@"; TYPE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --version) need_value "$@"; VERSION=$2; shift 2 ;;
    --repo) need_value "$@"; REPO=$2; MODE=clone; shift 2 ;;
    --branch) need_value "$@"; BRANCH=$2; shift 2 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --extra-flags) [[ $# -ge 2 ]] || die "--extra-flags needs a value"; EXTRA=$2; shift 2 ;;
    --worker) need_value "$@"; WORKER=$2; shift 2 ;;
    --lines) need_value "$@"; LINES=$2; shift 2 ;;
    --remote-dir) need_value "$@"; REMOTE_DIR=$2; shift 2 ;;
    --) shift; PASS=("$@"); break ;;
    -*) die "unknown option: $arg" ;;
    *)
      [[ -z $CMD ]] || die "unexpected argument: $arg (the command is already '$CMD')"
      CMD=$arg; shift ;;
  esac
done

case $CMD in
  create | setup | run | logs | stop | delete) ;;
  "") die "missing command (one of create, setup, run, logs, stop, delete)" ;;
  *) die "unknown command: $CMD (one of create, setup, run, logs, stop, delete)" ;;
esac
[[ -n $NAME ]] || die "missing --name"
[[ -n $ZONE ]] || die "missing --zone"
if [[ $CMD == create || $CMD == run ]]; then
  [[ -n $TYPE ]] || die "missing --accelerator-type (needed by $CMD)"
fi
[[ $REMOTE_DIR =~ ^[A-Za-z0-9._-]+$ ]] || die "--remote-dir must be a plain directory name, got '$REMOTE_DIR'"
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines must be a number, got '$LINES'"

HOSTS=""
if [[ -n $TYPE ]]; then
  HOSTS=$(hosts_for_type "$TYPE")
  [[ -n $HOSTS ]] || echo "tpu_vm.sh: warning: unknown accelerator type '$TYPE'; treating it as multi-host" >&2
fi
if [[ $WORKER != all ]]; then
  [[ $WORKER =~ ^[0-9]+$ ]] || die "--worker must be a worker index or 'all', got '$WORKER'"
  if [[ -n $HOSTS ]] && ((WORKER >= HOSTS)); then
    die "--worker $WORKER is out of range: $TYPE has $HOSTS worker(s), 0..$((HOSTS - 1))"
  fi
fi

GC=("$GCLOUD" compute tpus tpu-vm)
LOC=(--zone="$ZONE")
[[ -z $PROJECT ]] || LOC+=(--project="$PROJECT")

# Remote paths, relative to the remote $HOME, expanded by the remote shell.
R_CODE="\"\$HOME/$REMOTE_DIR\""
R_VENV="\"\$HOME/${REMOTE_DIR}_venv\""
R_LOGS="\"\$HOME/${REMOTE_DIR}_logs\""
R_LOG="\"\$HOME/${REMOTE_DIR}_logs/run-\$(hostname).log\""
R_PID="\"\$HOME/${REMOTE_DIR}_logs/run.pid\""
# shellcheck disable=SC2088  # the tilde is text for messages printed on the workers, not a path
LOG_TXT="~/${REMOTE_DIR}_logs/run-\$(hostname).log"

ssh_workers() {  # ssh_workers WORKER REMOTE_COMMAND
  run_cmd "${GC[@]}" ssh "$NAME" "${LOC[@]}" --worker="$1" --command="$2"
}

if [[ $DRY_RUN == 1 && -n $TYPE ]]; then
  echo "# $TYPE: ${HOSTS:-unknown number of} host(s); remote commands run on --worker=all unless --worker is given"
fi

# ---------------------------------------------------------------------------------------------- commands
case $CMD in
  create)
    create=("${GC[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$TYPE"
            --version="${VERSION:-$(default_version "$TYPE")}")
    [[ $SPOT == 0 ]] || create+=(--spot)
    run_cmd "${create[@]}"
    ;;

  setup)
    # pip needs Python 3.11 (pyproject.toml); the TPU runtime images are Ubuntu 22.04 with Python 3.10, so
    # python3.11 and its venv module come from apt when missing.
    install="set -e"
    install+="; if ! command -v python3.11 >/dev/null 2>&1; then sudo apt-get update -qq"
    install+=" && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv; fi"
    install+="; [ -x $R_VENV/bin/python ] || python3.11 -m venv $R_VENV"
    install+="; $R_VENV/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip"
    install+="; $R_VENV/bin/python -m pip install --quiet --disable-pip-version-check -e $R_CODE'[tpu]'"
    install+="; $R_VENV/bin/python -c 'import sys, jax; print(\"ready: python\", sys.version.split()[0],"
    install+=" \"jax\", jax.__version__)'"
    if [[ $MODE == clone ]]; then
      clone=(git clone --quiet --depth 1)
      [[ -z $BRANCH ]] || clone+=(--branch "$BRANCH")
      clone+=("$REPO")
      ssh_workers all "set -e; rm -rf $R_CODE; $(shjoin "${clone[@]}") $R_CODE"
    else
      [[ -z $BRANCH ]] || die "--branch only goes with --repo"
      # A clean copy of the checkout: tracked files plus untracked ones git does not ignore, so that neither
      # .venv, workdir/ nor caches travel. The old remote copy is removed first so deleted files do not linger
      # (the venv and the logs live beside it and stay).
      if [[ $DRY_RUN == 1 ]]; then
        stage="${TMPDIR:-/tmp}/idmr_jax-stage.XXXXXX"
        echo "# stage a clean copy of $ROOT (git ls-files --cached --others --exclude-standard) in $stage/$REMOTE_DIR"
      else
        stage=$(mktemp -d "${TMPDIR:-/tmp}/idmr_jax-stage.XXXXXX")
        trap 'rm -rf "$stage"' EXIT
        mkdir "$stage/$REMOTE_DIR"
        if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
          (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
            while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done |
            tar --null -T - -cf -) | tar -C "$stage/$REMOTE_DIR" -xf -
        else
          tar -C "$ROOT" --exclude=./.git --exclude='./.venv*' --exclude=./workdir --exclude='__pycache__' \
            -cf - . | tar -C "$stage/$REMOTE_DIR" -xf -
        fi
      fi
      ssh_workers all "rm -rf $R_CODE"
      run_cmd "${GC[@]}" scp --recurse "$stage/$REMOTE_DIR" "$NAME:" "${LOC[@]}" --worker=all
    fi
    ssh_workers all "$install"
    ;;

  run)
    [[ -n $CONFIG ]] || die "missing --config (e.g. configs/oacir.py)"
    if [[ -z $WORKDIR ]]; then
      # Default: gs://$IDMR_GCS_BUCKET/idmr_jax/NAME. A dry run without a bucket shows a placeholder instead.
      if [[ -n ${IDMR_GCS_BUCKET:-} ]]; then
        WORKDIR="gs://${IDMR_GCS_BUCKET#gs://}/idmr_jax/$NAME"
      elif [[ $DRY_RUN == 1 ]]; then
        WORKDIR="gs://BUCKET/idmr_jax/$NAME"
        echo "# no --workdir and no IDMR_GCS_BUCKET: showing the placeholder $WORKDIR" >&2
      else
        die "missing --workdir (e.g. gs://BUCKET/run), or set IDMR_GCS_BUCKET for gs://\$IDMR_GCS_BUCKET/idmr_jax/$NAME"
      fi
    fi
    if [[ $WORKDIR != gs://* ]] && [[ -z $HOSTS || $HOSTS -gt 1 ]]; then
      die "--workdir must be a gs:// path on a multi-host slice ($TYPE has ${HOSTS:-an unknown number of} hosts):" \
        "every host writes its shards of each checkpoint and must read all of them back to resume, so all" \
        "hosts need the same directory; a local path would give each host its own partial copy"
    fi
    main=(-m idmr_jax.main --config="$CONFIG" --workdir="$WORKDIR")
    if [[ -n $EXTRA ]]; then
      read -r -a extra_words <<<"$EXTRA"
      main+=("${extra_words[@]}")
    fi
    main+=("${PASS[@]}")
    # IDMR_DISTRIBUTED=1 makes idmr_jax.runtime call jax.distributed.initialize(), which finds the slice's
    # workers from the TPU metadata by itself. nohup, the redirections and the pid file let the job outlive
    # the ssh session; a job still running from an earlier `run` is not started twice.
    remote="cd $R_CODE || exit 1; mkdir -p $R_LOGS"
    remote+="; if [ -f $R_PID ] && kill -0 \"\$(cat $R_PID)\" 2>/dev/null; then"
    remote+=" echo \"\$(hostname): already running (pid \$(cat $R_PID)); use stop first\" >&2; exit 1; fi"
    remote+="; echo \"=== \$(date -u +%FT%TZ) start on \$(hostname)\" >> $R_LOG"
    remote+="; IDMR_DISTRIBUTED=1 nohup $R_VENV/bin/python $(shjoin "${main[@]}") >> $R_LOG 2>&1 < /dev/null &"
    remote+=" echo \$! > $R_PID; echo \"\$(hostname): started pid \$(cat $R_PID), log $LOG_TXT\""
    ssh_workers all "$remote"
    ;;

  logs)
    tail_opts="-n $LINES"
    sed_opts=""
    [[ $FOLLOW == 0 ]] || { tail_opts+=" -F"; sed_opts="-u "; }
    remote="if [ ! -f $R_LOG ]; then echo \"\$(hostname): no log at $LOG_TXT\" >&2; exit 1; fi"
    remote+="; tail $tail_opts $R_LOG | sed ${sed_opts}\"s/^/[\$(hostname)] /\""
    ssh_workers "$WORKER" "$remote"
    ;;

  stop)
    remote="if [ -f $R_PID ] && kill \"\$(cat $R_PID)\" 2>/dev/null; then"
    remote+=" echo \"\$(hostname): stopped pid \$(cat $R_PID)\""
    remote+="; else echo \"\$(hostname): nothing running\"; fi; rm -f $R_PID"
    ssh_workers "$WORKER" "$remote"
    ;;

  delete)
    run_cmd "${GC[@]}" delete "$NAME" "${LOC[@]}" --quiet
    ;;
esac
