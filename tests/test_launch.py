"""Tests of the launch scripts: shellcheck, dry runs, and runs against fake gcloud / Slurm tools.

No cloud or cluster is touched: `gcloud`, `scontrol` and `srun` are replaced by small scripts that record their
arguments and run the remote/task commands locally, in throwaway home directories.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TPU = ROOT / "launch" / "tpu_vm.sh"
SLURM = ROOT / "launch" / "gpu_slurm.sh"
BASE = ["--name", "test", "--zone", "us-central2-b"]
V4_16 = BASE + ["--accelerator-type", "v4-16"]


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _clean_env(**extra) -> dict:
    """The test process's environment without anything the scripts read (XLA/Slurm/JAX settings)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "JAX_", "XLA_", "NCCL_", "IDMR_", "CLOUDSDK_")) and k != "DRY_RUN"}
    env.update(extra)
    return env


def tpu(*args, env=None, check=True):
    proc = subprocess.run(["bash", str(TPU), *args], capture_output=True, text=True, env=env or _clean_env(),
                          cwd=ROOT, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def gcloud_lines(stdout: str) -> list[list[str]]:
    """The printed commands as argument vectors (comment lines dropped); each must parse as shell words."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


def flag(argv: list[str], name: str) -> str | None:
    for a in argv:
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


# ------------------------------------------------------------------------------------------------- shellcheck
SHELL_SCRIPTS = sorted({"launch/tpu_vm.sh", "launch/gpu_slurm.sh", ".ci/run",
                        *(str(Path(p).relative_to(ROOT)) for p in glob.glob(str(ROOT / "scripts" / "*.sh")))})


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck); CI installs it")
    proc = subprocess.run(["shellcheck", "-x", script], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------- tpu_vm.sh
def test_tpu_run_dry_run_v4_16():
    out = tpu("--dry-run", "run", *V4_16, "--config", "configs/oacir.py", "--workdir", "gs://bucket/run",
              "--extra-flags", "--config.train.num_steps=10 --config.seed=3", "--", "--config.data.tokenizer=a b")
    assert "v4-16: 2 host(s)" in out.stdout
    cmds = gcloud_lines(out.stdout)
    assert len(cmds) == 1
    argv = cmds[0]
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "test"]
    assert flag(argv, "--zone") == "us-central2-b"
    assert flag(argv, "--worker") == "all"
    remote = shlex.split(flag(argv, "--command"))
    i = remote.index("-m")
    assert remote[i:i + 7] == ["-m", "idmr_jax.main", "--config=configs/oacir.py", "--workdir=gs://bucket/run",
                               "--config.train.num_steps=10", "--config.seed=3", "--config.data.tokenizer=a b"]
    assert "nohup" in remote and "IDMR_DISTRIBUTED=1" in remote
    assert any(w.endswith("/bin/python") for w in remote)
    assert any("_logs/run-$(hostname).log" in w for w in remote)  # one log per worker


def test_tpu_dry_runs_of_every_command_v4_16():
    create = gcloud_lines(tpu("--dry-run", "create", *V4_16).stdout)
    assert create == [["gcloud", "compute", "tpus", "tpu-vm", "create", "test", "--zone=us-central2-b",
                       "--accelerator-type=v4-16", "--version=tpu-ubuntu2204-base"]]

    setup = gcloud_lines(tpu("--dry-run", "setup", *V4_16).stdout)
    assert [c[4] for c in setup] == ["ssh", "scp", "ssh"]
    assert all(flag(c, "--worker") == "all" for c in setup)
    assert flag(setup[0], "--command") == 'rm -rf "$HOME/idmr_jax"'
    scp = setup[1]
    assert "--recurse" in scp and "test:" in scp
    assert Path(scp[scp.index("--recurse") + 1]).name == "idmr_jax"
    install = flag(setup[2], "--command")
    assert "python3.11 -m venv" in install and "[tpu]" in install and "pip install" in install

    clone = gcloud_lines(tpu("--dry-run", "setup", *V4_16, "--repo", "https://example.com/idmr.git",
                             "--branch", "main").stdout)
    assert [c[4] for c in clone] == ["ssh", "ssh"]
    assert all(flag(c, "--worker") == "all" for c in clone)
    assert "git clone --quiet --depth 1 --branch main https://example.com/idmr.git" in flag(clone[0], "--command")

    logs = gcloud_lines(tpu("--dry-run", "logs", *V4_16).stdout)
    assert len(logs) == 1 and flag(logs[0], "--worker") == "all"
    assert "tail -n 100" in flag(logs[0], "--command")
    one = gcloud_lines(tpu("--dry-run", "logs", *V4_16, "--worker", "1", "--follow", "--lines", "7").stdout)
    assert flag(one[0], "--worker") == "1" and "tail -n 7 -F" in flag(one[0], "--command")

    stop = gcloud_lines(tpu("--dry-run", "stop", *V4_16).stdout)
    assert len(stop) == 1 and flag(stop[0], "--worker") == "all"

    delete = gcloud_lines(tpu("--dry-run", "delete", *V4_16, "--project", "my-proj").stdout)
    assert delete == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "test", "--zone=us-central2-b",
                       "--project=my-proj", "--quiet"]]


@pytest.mark.parametrize("acc,hosts,version", [
    ("v4-8", 1, "tpu-ubuntu2204-base"), ("v4-16", 2, "tpu-ubuntu2204-base"), ("v4-64", 8, "tpu-ubuntu2204-base"),
    ("v5litepod-8", 1, "v2-alpha-tpuv5-lite"), ("v5litepod-16", 4, "v2-alpha-tpuv5-lite"),
    ("v5p-8", 1, "v2-alpha-tpuv5"), ("v5p-32", 4, "v2-alpha-tpuv5"), ("v6e-16", 4, "v2-alpha-tpuv6e"),
])
def test_tpu_hosts_and_default_runtime(acc, hosts, version):
    out = tpu("--dry-run", "create", *BASE, "--accelerator-type", acc, "--spot").stdout
    assert f"{acc}: {hosts} host(s)" in out
    argv = gcloud_lines(out)[0]
    assert flag(argv, "--version") == version and "--spot" in argv
    custom = gcloud_lines(tpu("--dry-run", "create", *BASE, "--accelerator-type", acc, "--version", "x-1").stdout)
    assert flag(custom[0], "--version") == "x-1"


@pytest.mark.parametrize("args,message", [
    ([], "missing command"),
    (["launch"], "unknown command"),
    (["run", "--zone", "z", "--accelerator-type", "v4-8"], "missing --name"),
    (["create", "--name", "n", "--accelerator-type", "v4-8"], "missing --zone"),
    (["create", "--name", "n", "--zone", "z"], "missing --accelerator-type"),
    (["run", *V4_16, "--workdir", "gs://b/r"], "missing --config"),
    (["delete", *BASE, "--bogus"], "unknown option"),
    (["delete", "--name"], "--name needs a value"),
    (["logs", *V4_16, "--worker", "2"], "out of range"),
    (["setup", *V4_16, "--branch", "main"], "--branch only goes with --repo"),
])
def test_tpu_usage_errors(args, message):
    proc = tpu("--dry-run", *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr and "Usage:" in proc.stderr
    assert proc.stdout.count("gcloud") == 0


def test_tpu_run_default_workdir():
    """The issue's acceptance command has no --workdir: a dry run shows a gs:// placeholder, IDMR_GCS_BUCKET gives
    the real default, and a real run without either stops before any gcloud call."""
    cmd = ["run", *V4_16, "--config", "configs/oacir.py"]
    out = tpu("--dry-run", *cmd)
    (line,) = gcloud_lines(out.stdout)
    assert flag(line, "--worker") == "all"
    assert "--workdir=gs://BUCKET/idmr_jax/test" in flag(line, "--command")
    assert "placeholder" in out.stderr
    out = tpu("--dry-run", *cmd, env=_clean_env(IDMR_GCS_BUCKET="gs://my-bucket"))
    assert "--workdir=gs://my-bucket/idmr_jax/test" in flag(gcloud_lines(out.stdout)[0], "--command")
    proc = tpu(*cmd, check=False, env=_clean_env(PATH="/usr/bin:/bin"))
    assert proc.returncode == 2 and "missing --workdir" in proc.stderr and "Traceback" not in proc.stderr


def test_tpu_help():
    proc = tpu("--help")
    assert proc.stdout.startswith("Usage:") and "--accelerator-type" in proc.stdout


def test_tpu_local_workdir_refused_on_multi_host():
    proc = tpu("--dry-run", "run", *V4_16, "--config", "configs/oacir.py", "--workdir", "/tmp/run", check=False)
    assert proc.returncode != 0 and "gs://" in proc.stderr and "every host" in proc.stderr
    unknown = tpu("--dry-run", "run", *BASE, "--accelerator-type", "v9z-99", "--config", "c.py", "--workdir", "w",
                  check=False)
    assert unknown.returncode != 0 and "gs://" in unknown.stderr
    # One host: a local directory on that host is fine.
    single = tpu("--dry-run", "run", *BASE, "--accelerator-type", "v4-8", "--config", "configs/oacir.py",
                 "--workdir", "/tmp/run")
    assert "--workdir=/tmp/run" in shlex.split(flag(gcloud_lines(single.stdout)[0], "--command"))


# --- tpu_vm.sh for real, against a fake gcloud that plays N workers in local home directories ---------------
FAKE_GCLOUD = """
    #!{python}
    import json, os, shutil, subprocess, sys
    from pathlib import Path
    root = Path(os.environ["FAKE_TPU_ROOT"])
    with open(root / "calls.jsonl", "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
    args = sys.argv[1:]
    assert args[:3] == ["compute", "tpus", "tpu-vm"], args
    opts = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
    n = int(os.environ["FAKE_TPU_WORKERS"])
    workers = range(n) if opts.get("--worker", "0") == "all" else [int(opts["--worker"])]
    rc = 0
    for w in workers:
        home = root / f"worker{{w}}"
        home.mkdir(exist_ok=True)
        if args[3] == "ssh":
            env = dict(os.environ, HOME=str(home), FAKE_HOSTNAME=f"host-w{{w}}")
            rc |= subprocess.run(["bash", "-c", opts["--command"]], env=env).returncode
        elif args[3] == "scp":
            src = Path(args[args.index("--recurse") + 1])
            shutil.copytree(src, home / src.name)
    sys.exit(rc)
"""


@pytest.fixture
def fake_tpu(tmp_path):
    root = tmp_path / "tpu"
    root.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = _write_exe(bin_dir / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
    _write_exe(bin_dir / "hostname", '#!/usr/bin/env bash\necho "$FAKE_HOSTNAME"\n')
    env = _clean_env(GCLOUD=str(gcloud), FAKE_TPU_ROOT=str(root), FAKE_TPU_WORKERS="2",
                     PATH=f"{bin_dir}:{os.environ['PATH']}")
    return root, env


def _calls(root: Path) -> list[list[str]]:
    return [json.loads(line) for line in (root / "calls.jsonl").read_text().splitlines()]


def test_tpu_setup_copies_a_clean_checkout_to_every_worker(fake_tpu, tmp_path):
    root, env = fake_tpu
    # Every ssh command succeeds without installing anything: python3.11 and the venv are fakes.
    bin_dir = Path(env["PATH"].split(":")[0])
    _write_exe(bin_dir / "python3.11", """
        #!/usr/bin/env bash
        # fake `python3.11 -m venv DIR`: a venv whose python only records its arguments
        mkdir -p "$3/bin" && printf '#!/usr/bin/env bash\\necho "$@" >> "$(dirname "$0")/calls"\\n' > "$3/bin/python"
        chmod +x "$3/bin/python"
    """)
    stage_tmp = tmp_path / "tmp"
    stage_tmp.mkdir()
    proc = tpu("setup", *V4_16, env={**env, "TMPDIR": str(stage_tmp)})
    assert [c[3] for c in _calls(root)] == ["ssh", "scp", "ssh"]
    assert all(flag(c, "--worker") == "all" for c in _calls(root))
    for w in (0, 1):
        code = root / f"worker{w}" / "idmr_jax"
        assert (code / "pyproject.toml").is_file() and (code / "idmr_jax" / "main.py").is_file()
        assert (code / "launch" / "tpu_vm.sh").is_file()
        assert not (code / ".venv").exists() and not (code / ".git").exists()
        pip_calls = (root / f"worker{w}" / "idmr_jax_venv" / "bin" / "calls").read_text()
        assert f"-e {root}/worker{w}/idmr_jax[tpu]" in pip_calls
    assert "compute tpus tpu-vm scp --recurse" in proc.stderr  # each command is echoed as it runs
    assert list(stage_tmp.iterdir()) == []  # the staging copy is removed


def test_tpu_run_logs_stop_on_fake_workers(fake_tpu):
    root, env = fake_tpu
    for w in (0, 1):  # what `setup` leaves: the code directory and a venv (here a python that logs and waits)
        (root / f"worker{w}" / "idmr_jax").mkdir(parents=True)
        (root / f"worker{w}" / "idmr_jax_venv" / "bin").mkdir(parents=True)
        _write_exe(root / f"worker{w}" / "idmr_jax_venv" / "bin" / "python", """
            #!/usr/bin/env bash
            echo "args: $*"
            echo "cwd: $(pwd) IDMR_DISTRIBUTED=$IDMR_DISTRIBUTED"
            exec sleep 30
        """)
    args = [*V4_16, "--config", "configs/oacir.py:tiny", "--workdir", "gs://bucket/run", "--", "--config.x=a b"]
    tpu("run", *args, env=env)
    logs = {}
    for w in (0, 1):
        log = root / f"worker{w}" / "idmr_jax_logs" / f"run-host-w{w}.log"
        for _ in range(100):
            if log.exists() and "IDMR_DISTRIBUTED" in log.read_text():
                break
            time.sleep(0.05)
        logs[w] = log.read_text()
        assert "args: -m idmr_jax.main --config=configs/oacir.py:tiny --workdir=gs://bucket/run --config.x=a b" \
            in logs[w]
        assert f"cwd: {root}/worker{w}/idmr_jax IDMR_DISTRIBUTED=1" in logs[w]
    pids = [int((root / f"worker{w}" / "idmr_jax_logs" / "run.pid").read_text()) for w in (0, 1)]
    try:
        for pid in pids:
            os.kill(pid, 0)  # still running after the ssh session ended
        again = tpu("run", *args, env=env, check=False)  # not started twice
        assert again.returncode != 0 and "already running" in again.stderr

        out = tpu("logs", *V4_16, env=env).stdout
        assert "[host-w0] args: -m idmr_jax.main" in out and "[host-w1] args: -m idmr_jax.main" in out
        one = tpu("logs", *V4_16, "--worker", "1", env=env).stdout
        assert "[host-w1]" in one and "[host-w0]" not in one

        tpu("stop", *V4_16, env=env)
        for pid in pids:
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            else:
                pytest.fail(f"pid {pid} still running after stop")
    finally:
        for pid in pids:  # only the fake jobs this test started
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


# ------------------------------------------------------------------------------------------------ gpu_slurm.sh
SLURM_ENV = dict(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[001-002]", SLURM_JOB_NUM_NODES="2",
                 SLURM_NTASKS="2", SLURM_CPUS_PER_TASK="16", WORKDIR="/shared/runs/oacir")


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "slurmbin"
    bin_dir.mkdir()
    # scontrol show hostnames: expands the one node list the tests use, as Slurm would.
    _write_exe(bin_dir / "scontrol", """
        #!/usr/bin/env bash
        [[ $1 == show && $2 == hostnames ]] || { echo "fake scontrol: unsupported: $*" >&2; exit 1; }
        case $3 in
          "gpu[001-002]") printf 'gpu001\\ngpu002\\n' ;;
          *) printf '%s\\n' "${3//,/$'\\n'}" ;;
        esac
    """)
    # srun: starts --ntasks tasks (block distribution over the nodes), each with its SLURM_PROCID/LOCALID.
    _write_exe(bin_dir / "srun", """
        #!/usr/bin/env bash
        echo "srun $*" >> "$FAKE_SLURM_LOG"
        ntasks=1; per_node=1
        while [[ $1 == --* ]]; do
          case $1 in --ntasks=*) ntasks=${1#*=} ;; --ntasks-per-node=*) per_node=${1#*=} ;; esac
          shift
        done
        pids=()
        for ((i = 0; i < ntasks; i++)); do
          SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) SLURM_NODEID=$((i / per_node)) "$@" &
          pids+=($!)
        done
        rc=0
        for p in "${pids[@]}"; do wait "$p" || rc=1; done
        exit $rc
    """)
    return bin_dir


def slurm(bin_dir, *args, check=True, **env):
    full = _clean_env(**{**SLURM_ENV, **env})
    full["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    proc = subprocess.run(["bash", str(SLURM), *args], capture_output=True, text=True, env=full, cwd="/",
                          timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _exports(stdout: str) -> dict:
    out = {}
    for line in stdout.splitlines():
        if line.startswith("export "):
            key, value = shlex.split(line[len("export "):])[0].split("=", 1)
            out[key] = value
    return out


def test_slurm_dry_run_prints_distributed_env_and_srun(fake_slurm):
    proc = slurm(fake_slurm, "--config.train.num_steps=5", DRY_RUN="1", CONFIG="configs/oacir.py:paper")
    env = _exports(proc.stdout)
    assert env["JAX_COORDINATOR_ADDRESS"] == f"gpu001:{20000 + 4242 % 10000}"
    assert env["JAX_NUM_PROCESSES"] == "2"
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env["XLA_FLAGS"].split()
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90" and env["NCCL_DEBUG"] == "WARN"
    srun = [shlex.split(line) for line in proc.stdout.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1
    argv = srun[0]
    assert flag(argv, "--nodes") == "2" and flag(argv, "--ntasks") == "2"
    assert flag(argv, "--ntasks-per-node") == "1" and flag(argv, "--cpus-per-task") == "16"
    task = argv[argv.index("-c") + 1]
    assert 'JAX_PROCESS_ID="$SLURM_PROCID"' in task  # set per task, not once for the job
    i = argv.index("-m")
    assert argv[i - 1] == str(ROOT / ".venv-cuda" / "bin" / "python")
    assert argv[i:] == ["-m", "idmr_jax.main", "--config=configs/oacir.py:paper", "--workdir=/shared/runs/oacir",
                        "--config.train.num_steps=5"]
    # The user's own settings win over the script's defaults.
    custom = _exports(slurm(fake_slurm, DRY_RUN="1", XLA_PYTHON_CLIENT_MEM_FRACTION="0.5",
                            XLA_FLAGS="--xla_dump_to=/tmp/d", JAX_COORDINATOR_PORT="1234").stdout)
    assert custom["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5" and custom["XLA_FLAGS"].endswith("--xla_dump_to=/tmp/d")
    assert custom["JAX_COORDINATOR_ADDRESS"] == "gpu001:1234"


def test_slurm_missing_settings(fake_slurm):
    proc = slurm(fake_slurm, check=False, DRY_RUN="1", WORKDIR="")
    assert proc.returncode != 0 and "WORKDIR" in proc.stderr
    proc = slurm(fake_slurm, check=False, DRY_RUN="1", SLURM_JOB_NODELIST="")
    assert proc.returncode != 0 and "SLURM_JOB_NODELIST" in proc.stderr


def test_slurm_xla_flags_exist_in_this_xla(fake_slurm):
    """XLA aborts on an unknown flag in XLA_FLAGS; the GPU flags are parsed by the CPU build too."""
    flags = _exports(slurm(fake_slurm, DRY_RUN="1").stdout)["XLA_FLAGS"]
    proc = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                          capture_output=True, text=True, env=_clean_env(XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "3.0", proc.stderr[-2000:]


def _fake_venv(tmp_path: Path, body: str) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    _write_exe(venv / "bin" / "python", "#!/usr/bin/env bash\n" + body)
    return venv


@pytest.mark.parametrize("ntasks,visible,local_ids", [
    ("2", None, None),             # one process per node: it drives all of its node's GPUs
    ("4", None, "0,1,0,1"),        # one process per GPU: each picks its GPU by SLURM_LOCALID
    ("4", "3", None),              # ... unless Slurm already bound one GPU per task
])
def test_slurm_tasks_get_their_process_ids(fake_slurm, tmp_path, ntasks, visible, local_ids):
    out = tmp_path / "tasks.txt"
    venv = _fake_venv(tmp_path, f'echo "$JAX_PROCESS_ID $JAX_NUM_PROCESSES $JAX_COORDINATOR_ADDRESS '
                                f'${{JAX_LOCAL_DEVICE_IDS:--}} $*" >> {out}\n')
    extra = {"CUDA_VISIBLE_DEVICES": visible} if visible else {}
    slurm(fake_slurm, "--config.seed=1", SLURM_NTASKS=ntasks, IDMR_VENV=str(venv), IDMR_SKIP_INSTALL="1",
          FAKE_SLURM_LOG=str(tmp_path / "srun.log"), **extra)
    rows = sorted(line.split(" ", 4) for line in out.read_text().splitlines())
    n = int(ntasks)
    assert [r[0] for r in rows] == [str(i) for i in range(n)]
    assert {r[1] for r in rows} == {ntasks} and {r[2] for r in rows} == {"gpu001:24242"}
    assert [r[3] for r in rows] == (local_ids.split(",") if local_ids else ["-"] * n)
    assert {r[4] for r in rows} == {"-m idmr_jax.main --config=configs/oacir.py --workdir=/shared/runs/oacir "
                                    "--config.seed=1"}


def test_slurm_env_initialises_jax_distributed(fake_slurm, tmp_path):
    """Two real processes on this machine: the script's environment -> idmr_jax.runtime -> jax.distributed."""
    # One os.write per process: the two processes share the pipe, and a single short write is not interleaved.
    code = ("import os; from idmr_jax import runtime; runtime.initialize(); import jax; "
            "os.write(1, f'process {jax.process_index()} of {jax.process_count()}\\n'.encode())")
    venv = _fake_venv(tmp_path, f'cd {ROOT} && exec {sys.executable} -c "{code}"\n')
    proc = slurm(fake_slurm, SLURM_JOB_NODELIST="localhost", IDMR_VENV=str(venv), IDMR_SKIP_INSTALL="1",
                 JAX_PLATFORMS="cpu", JAX_COORDINATOR_PORT=str(20000 + os.getpid() % 20000),
                 FAKE_SLURM_LOG=str(tmp_path / "srun.log"))
    assert "process 0 of 2" in proc.stdout and "process 1 of 2" in proc.stdout, proc.stderr[-3000:]
