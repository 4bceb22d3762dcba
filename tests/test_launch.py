"""launch/tpu_vm.sh and launch/gpu.sh: their --dry-run output, their errors, and (with a
fake gcloud, scontrol and python) the commands they really run. Bash only, no network."""

import json
import os
import shlex
import stat
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(REPO, "launch", "tpu_vm.sh")
GPU = os.path.join(REPO, "launch", "gpu.sh")
SCRIPTS = (TPU, GPU)
JAX_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
SEEN_VARS = ("PIVQ_JAX_DISTRIBUTED", "TFDS_DATA_DIR") + JAX_VARS
# Trainer flags with spaces and both kinds of quotes must arrive unchanged.
EXTRA = ["--config.batch_size=32", "--config.note=two words", "--config.q=it's \"quoted\"",
         "--config.glob=*[x]$HOME;|&"]
TPU_ARGS = ["--name=pivq-v4", "--zone=us-central2-b", "--accelerator=v4-8",
            "--version=tpu-ubuntu2204-base", "--workdir=gs://bucket/run",
            "--tfds-data-dir=gs://bucket/tfds", "--config=configs/celebahq.py"]
GPU_ARGS = ["--config=configs/celebahq.py", "--workdir=/runs/celebahq"]


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in SEEN_VARS and not k.startswith(
      ("SLURM_", "PIVQ_LAUNCH"))}
  env.update(extra)
  return env


def _run(script, *args, env=None, cwd=REPO):
  return subprocess.run(["bash", script, *args], capture_output=True, text=True, cwd=cwd,
                        env=env if env is not None else _env(), timeout=60)


def _dry(script, *args, env=None):
  """The dry-run's commands, each split the way a shell would split it."""
  out = _run(script, "--dry-run", *args, env=env)
  assert out.returncode == 0, out.stderr
  return [shlex.split(line) for line in out.stdout.splitlines()]


def _write_exe(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return str(path)


def _fake_python(path):
  """Stands in for python: prints its argv and the launch env vars as JSON."""
  return _write_exe(path, f"""#!{sys.executable}
import json, os, sys
print(json.dumps({{"argv": sys.argv[1:],
                  "env": {{k: os.environ.get(k) for k in {SEEN_VARS!r}}}}}), flush=True)
""")




def _remote(cmd):
  """The --command= of a `gcloud compute tpus tpu-vm ssh` line."""
  (value,) = [a[len("--command="):] for a in cmd if a.startswith("--command=")]
  return value


# ----------------------------------------------------------------------------------------
# Both scripts.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_are_executable(script):
  assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
  assert os.access(script, os.X_OK)
  with open(script) as f:
    assert f.readline().startswith("#!") and "set -euo pipefail" in f.read()


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_kill_nothing_by_name_and_copy_no_keys(script):
  with open(script) as f:
    text = f.read().lower()
  for banned in ("killall", "pkill", "ssh-copy-id", ".ssh/", "id_rsa", "id_ed25519",
                 "authorized_keys", "google_compute_engine", "credentials",
                 ".config/gcloud", "service-account", "key-file"):
    assert banned not in text, banned


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
  out = _run(script, "--help")
  assert out.returncode == 0 and out.stdout.startswith("Usage:") and "--dry-run" in out.stdout


@pytest.mark.parametrize("script,args", [(TPU, TPU_ARGS), (GPU, GPU_ARGS)])
@pytest.mark.parametrize("bad,message", [
    (["--bogus"], "unknown option '--bogus'"),
    (["--bogus=1"], "unknown option '--bogus'"),
    (["stray"], "unexpected argument 'stray'"),
    (["--dry-run=yes"], "--dry-run takes no value"),
])
def test_bad_arguments_exit_2_with_one_sentence(script, args, bad, message):
  out = _run(script, "--dry-run", *args, *bad)
  assert out.returncode == 2 and out.stdout == ""
  assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("script,args", [(TPU, TPU_ARGS), (GPU, GPU_ARGS)])
def test_missing_workdir_exits_2(script, args):
  out = _run(script, "--dry-run", *[a for a in args if not a.startswith("--workdir")])
  assert out.returncode == 2 and "--workdir is required" in out.stderr


# ----------------------------------------------------------------------------------------
# tpu_vm.sh
# ----------------------------------------------------------------------------------------
def test_tpu_dry_run_ships_installs_and_runs_on_all_workers():
  cmds = _dry(TPU, *TPU_ARGS)
  assert not any(c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] for c in cmds)
  archive, scp, _, install, train = cmds
  assert archive[0] == "git" and "archive" in archive and archive[-1] == "HEAD"
  tarball = [a for a in archive if a.startswith("--output=")][0][len("--output="):]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and tarball in scp
  for cmd in (scp, install, train):
    assert "--worker=all" in cmd and "--zone=us-central2-b" in cmd
  for cmd in (install, train):
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pivq-v4"]
  remote_install = " ".join(shlex.split(_remote(install)))
  assert "pip install -q -e pivq_jax/src[tpu] -c pivq_jax/src/constraints.txt" in remote_install
  assert "python pivq_jax/src/third_party/fid_inception_weights.py" in remote_install
  remote = shlex.split(_remote(train))
  for want in ("PIVQ_JAX_DISTRIBUTED=1", "TFDS_DATA_DIR=gs://bucket/tfds", "pivq_jax.main",
               "--config=configs/celebahq.py", "--workdir=gs://bucket/run", "--mode=train",
               "--config.data.data_dir=gs://bucket/tfds"):
    assert want in remote, want


def test_tpu_create_only_when_asked():
  cmds = _dry(TPU, *TPU_ARGS, "--create", "--spot", "--project=my-proj")
  assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pivq-v4",
                     "--zone=us-central2-b", "--project=my-proj", "--accelerator-type=v4-8",
                     "--version=tpu-ubuntu2204-base", "--spot"]
  assert sum(c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] for c in cmds) == 1
  assert all("--project=my-proj" in c for c in cmds if c[0] == "gcloud")
  out = _run(TPU, "--dry-run", *TPU_ARGS, "--spot")
  assert out.returncode == 2 and "--spot only applies with --create" in out.stderr


def _tpu_worker_home(tmp_path):
  """A stand-in for a worker's home after the install step."""
  home = tmp_path / "home"
  (home / "pivq_jax" / "src").mkdir(parents=True)
  (home / "pivq_jax" / "logs").mkdir()
  (home / "pivq_jax" / "venv" / "bin").mkdir(parents=True)
  _fake_python(home / "pivq_jax" / "venv" / "bin" / "python")
  return home


def test_tpu_run_command_passes_trainer_flags_verbatim(tmp_path):
  """Runs the remote command the way a worker's shell would."""
  remote = _remote(_dry(TPU, *TPU_ARGS, "--", *EXTRA)[-1])
  home = _tpu_worker_home(tmp_path)
  out = subprocess.run(["bash", "-c", remote], capture_output=True, text=True, cwd=tmp_path,
                       env=_env(HOME=str(home)), timeout=60, check=True)
  seen = json.loads(out.stdout)
  assert seen["argv"] == ["-m", "pivq_jax.main", "--config=configs/celebahq.py",
                          "--workdir=gs://bucket/run", "--mode=train",
                          "--config.data.data_dir=gs://bucket/tfds", *EXTRA]
  assert seen["env"]["PIVQ_JAX_DISTRIBUTED"] == "1"
  assert seen["env"]["TFDS_DATA_DIR"] == "gs://bucket/tfds"


def test_tpu_detach_outlives_the_session_and_logs(tmp_path):
  remote = _remote(_dry(TPU, *TPU_ARGS, "--detach", "--mode=eval", "--", *EXTRA)[-1])
  assert "nohup setsid" in remote
  home = _tpu_worker_home(tmp_path)
  out = subprocess.run(["bash", "-c", remote], capture_output=True, text=True, cwd=tmp_path,
                       env=_env(HOME=str(home)), timeout=60, check=True)
  assert "started, log:" in out.stdout
  logs = home / "pivq_jax" / "logs"
  for _ in range(100):
    done = [p for p in logs.iterdir() if p.read_text().endswith("\n")]
    if done:
      break
    time.sleep(0.1)
  (log,) = done
  assert str(log) in out.stdout
  seen = json.loads(log.read_text())
  assert seen["argv"][4] == "--mode=eval" and seen["argv"][-len(EXTRA):] == EXTRA


@pytest.mark.parametrize("accelerator,workdir,ok", [
    ("v4-8", "gs://b/run", True),
    ("v4-8", "/home/me/run", True),
    ("v5litepod-8", "/home/me/run", True),
    ("v4-8", "run", False),  # relative: would sit inside the replaced code
    ("v4-32", "gs://b/run", True),
    ("v4-32", "/home/me/run", False),
    ("v5p-64", "/mnt/run", False),
    ("v6e-16", "/mnt/run", False),
])
def test_tpu_multi_host_needs_gs_workdir(accelerator, workdir, ok):
  args = [a for a in TPU_ARGS if not a.startswith(("--accelerator", "--workdir"))]
  out = _run(TPU, "--dry-run", *args, f"--accelerator={accelerator}", f"--workdir={workdir}")
  assert out.returncode == (0 if ok else 2), out.stderr
  if not ok:
    assert "--workdir must be" in out.stderr
    if accelerator != "v4-8":
      assert f"multi-host slice {accelerator}" in out.stderr


def test_tpu_config_must_be_in_head():
  args = [a for a in TPU_ARGS if not a.startswith("--config")]
  out = _run(TPU, "--dry-run", *args, "--config=configs/no_such_config.py")
  assert out.returncode == 2 and "not in git HEAD" in out.stderr
  assert _run(TPU, "--dry-run", *args, "--config=configs/celebahq.py:runlocal").returncode == 0


def test_tpu_really_runs_gcloud(tmp_path):
  """Without --dry-run, with a fake gcloud that records each call."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "calls.jsonl"
  _write_exe(bin_dir / "gcloud", f"""#!{sys.executable}
import json, os, sys, tarfile
call = {{"argv": sys.argv[1:]}}
if "scp" in sys.argv:
  with tarfile.open(sys.argv[sys.argv.index("scp") + 1]) as t:
    call["files"] = t.getnames()
with open({str(calls)!r}, "a") as f:
  f.write(json.dumps(call) + "\\n")
""")
  env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp_path))
  out = _run(TPU, *TPU_ARGS, "--", *EXTRA, env=env, cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  recorded = [json.loads(line) for line in calls.read_text().splitlines()]
  assert [c["argv"][3] for c in recorded] == ["scp", "ssh", "ssh"]
  assert "setup.cfg" in recorded[0]["files"] and "pivq_jax/main.py" in recorded[0]["files"]
  assert not list(tmp_path.glob("*.tar.gz"))  # the local tarball is cleaned up
  assert recorded[-1]["argv"] == _dry(TPU, *TPU_ARGS, "--", *EXTRA)[-1][1:]


# ----------------------------------------------------------------------------------------
# gpu.sh
# ----------------------------------------------------------------------------------------
def test_gpu_single_host_is_a_plain_run():
  (cmd,) = _dry(GPU, *GPU_ARGS, "--", *EXTRA)
  assert cmd == ["python", "-m", "pivq_jax.main", "--config=configs/celebahq.py",
                 "--workdir=/runs/celebahq", "--mode=train", *EXTRA]
  assert "JAX_COORDINATOR_ADDRESS" not in " ".join(cmd)


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_gpu_multi_node_sets_the_three_vars(rank):
  cmds = _dry(GPU, *GPU_ARGS, "--num-nodes=3", f"--node-rank={rank}",
              "--coordinator=node0:1234", "--mode=eval", "--venv=/opt/my venv", "--", *EXTRA)
  assert cmds[0] == ["source", "/opt/my venv/bin/activate"]
  assert cmds[1] == ["env", "JAX_COORDINATOR_ADDRESS=node0:1234", "JAX_NUM_PROCESSES=3",
                     f"JAX_PROCESS_ID={rank}", "python", "-m", "pivq_jax.main",
                     "--config=configs/celebahq.py", "--workdir=/runs/celebahq",
                     "--mode=eval", *EXTRA]


@pytest.mark.parametrize("args,message", [
    (["--num-nodes=2", "--node-rank=2", "--coordinator=h:1"], "must be less than"),
    (["--num-nodes=2", "--node-rank=5", "--coordinator=h:1"], "must be less than"),
    (["--num-nodes=2", "--node-rank=1"], "--coordinator=HOST:PORT is required"),
    (["--num-nodes=2", "--coordinator=node0"], "--coordinator must be HOST:PORT"),
    (["--num-nodes=0"], "--num-nodes must be a positive integer"),
    (["--node-rank=-1"], "--node-rank must be a non-negative integer"),
    (["--config"], "--config needs a value"),
    (["--workdir", "--dry-run"], "--workdir needs a value"),
])
def test_gpu_bad_topology_exits_2(args, message):
  out = _run(GPU, "--dry-run", *GPU_ARGS, *args)
  assert out.returncode == 2 and out.stdout == ""
  assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1


def _slurm_env(**extra):
  return _env(SLURM_PROCID="1", SLURM_NNODES="2", SLURM_NTASKS="2",
              SLURM_JOB_NODELIST="gpu[07-08]", **extra)


def test_gpu_slurm_dry_run_reads_slurm_env():
  out = _run(GPU, "--dry-run", *GPU_ARGS, "--slurm", "--port=2222", env=_slurm_env())
  assert out.returncode == 0, out.stderr
  first, run = out.stdout.splitlines()
  assert first == "FIRST_HOST=$(scontrol show hostnames gpu\\[07-08\\] | head -n 1)"
  assert shlex.split(run)[:4] == ["env", "JAX_COORDINATOR_ADDRESS=${FIRST_HOST}:2222",
                                  "JAX_NUM_PROCESSES=2", "JAX_PROCESS_ID=1"]
  # The printed lines paste into a shell (with an scontrol on PATH).
  assert 'JAX_COORDINATOR_ADDRESS="${FIRST_HOST}":2222' in run


@pytest.mark.parametrize("env,message", [
    (dict(SLURM_NNODES="2"), "needs SLURM_PROCID"),
    (dict(SLURM_PROCID="0"), "needs SLURM_NNODES or SLURM_NTASKS"),
    (dict(SLURM_PROCID="0", SLURM_NNODES="2", SLURM_NTASKS="16"), "one process per node"),
    (dict(SLURM_PROCID="0", SLURM_NNODES="2"), "needs SLURM_JOB_NODELIST"),
])
def test_gpu_slurm_errors(env, message):
  out = _run(GPU, "--dry-run", *GPU_ARGS, "--slurm", env=_env(**env))
  assert out.returncode == 2 and message in out.stderr


def test_gpu_slurm_single_node_is_a_plain_run():
  env = _env(SLURM_PROCID="0", SLURM_NNODES="1", SLURM_JOB_NODELIST="gpu07")
  assert _dry(GPU, *GPU_ARGS, "--slurm", env=env)[0][0] == "python"


def test_gpu_really_runs_single_host(tmp_path):
  """Without --dry-run the command is exec'd: a fake python sees args and env."""
  fake = _fake_python(tmp_path / "fake python")
  out = _run(GPU, *GPU_ARGS, "--", *EXTRA, env=_env(PIVQ_LAUNCH_PYTHON=fake), cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  seen = json.loads(out.stdout)
  assert seen["argv"] == ["-m", "pivq_jax.main", "--config=configs/celebahq.py",
                          "--workdir=/runs/celebahq", "--mode=train", *EXTRA]
  assert all(seen["env"][k] is None for k in JAX_VARS)


def test_gpu_really_runs_multi_node(tmp_path):
  fake = _fake_python(tmp_path / "python")
  out = _run(GPU, *GPU_ARGS, "--num-nodes=4", "--node-rank=3", "--coordinator=10.0.0.1:5555",
             env=_env(PIVQ_LAUNCH_PYTHON=fake), cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout)["env"] == {
      "PIVQ_JAX_DISTRIBUTED": None, "TFDS_DATA_DIR": None,
      "JAX_COORDINATOR_ADDRESS": "10.0.0.1:5555", "JAX_NUM_PROCESSES": "4",
      "JAX_PROCESS_ID": "3"}


def test_gpu_really_runs_under_slurm(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _write_exe(bin_dir / "scontrol", """#!/usr/bin/env bash
[[ "$*" == "show hostnames gpu[07-08]" ]] || exit 1
printf 'gpu07\\ngpu08\\n'
""")
  fake = _fake_python(tmp_path / "python")
  env = _slurm_env(PIVQ_LAUNCH_PYTHON=fake, PATH=f"{bin_dir}:{os.environ['PATH']}")
  out = _run(GPU, *GPU_ARGS, "--slurm", env=env, cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  env_seen = json.loads(out.stdout)["env"]
  assert env_seen["JAX_COORDINATOR_ADDRESS"] == "gpu07:12345"
  assert (env_seen["JAX_NUM_PROCESSES"], env_seen["JAX_PROCESS_ID"]) == ("2", "1")


def test_gpu_venv_is_activated(tmp_path):
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  _fake_python(venv / "bin" / "python")
  # What matters of a real activate script: it puts the venv's bin/ first on PATH.
  (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\n')
  out = _run(GPU, *GPU_ARGS, f"--venv={venv}", cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout)["argv"][:2] == ["-m", "pivq_jax.main"]


def test_gpu_missing_venv_exits_2(tmp_path):
  out = _run(GPU, *GPU_ARGS, f"--venv={tmp_path}/nowhere", cwd=tmp_path)
  assert out.returncode == 2 and "has no bin/activate" in out.stderr
