"""The real recipes on a real Slurm cluster (slurmctld and two slurmd on loopback, started here):
their site settings come from environment variables, and slurm/l_e8_7m.sbatch, pointed at the
digits config, runs EP=2 over two nodes, is preempted with SIGUSR1, requeues itself, resumes and
ends with a straight run's losses."""
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import clean_env, read_metrics
from tests.slurm_cluster import LocalSlurmCluster

REPO = Path(__file__).resolve().parents[1]
STEPS = 30
OVERRIDES = [f"train.max_steps={STEPS}", "train.global_batch_size=32", "logging.every_steps=1",
             "checkpoint.every_steps=20", "parallel.ep=2", "sample.steps=2", "sample.per_class=1"]
DETERMINED = ("loss", "predictor_loss", "grad_norm", "lr", "c_avg", "capacity")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalSlurmCluster(tmp_path_factory.mktemp("cluster"), nodes=2, cpus_per_node=1) as running:
        yield running


def client_env(cluster, **variables) -> dict:
    """This test process's environment for Slurm clients: no launcher variables, this cluster."""
    return {**clean_env(), "SLURM_CONF": cluster.env["SLURM_CONF"], "PATH": cluster.env["PATH"], **variables}


def job_fields(cluster, job: int) -> dict:
    line = cluster.run("scontrol", "show", "job", "-o", str(job)).stdout
    return dict(re.findall(r"\b(\w+)=(\S+)", line))


def submit_recipe(env: dict, *sbatch: str, recipe: str = "slurm/l_e8_7m.sbatch") -> int:
    """`bash <recipe>` (it submits itself), or `sbatch <options> <recipe>`."""
    command = ["sbatch", *sbatch, recipe] if sbatch else ["bash", recipe]
    submitted = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    return int(re.search(r"Submitted batch job (\d+)", submitted.stdout).group(1))


def test_site_settings_come_from_environment_variables(cluster, tmp_path):
    ours = submit_recipe(client_env(
        cluster, NODES="2", TASKS_PER_NODE="1", GPUS_PER_NODE="0", CPUS_PER_TASK="1", TIME="7", ACCOUNT="proj",
        PARTITION="debug", SIGNAL_LEAD="120", LOG_DIR=str(tmp_path / "logs"), SBATCH_ARGS="--hold"))
    # Plain sbatch: sbatch's own variables override the #SBATCH lines (nodes and tasks only by option).
    plain = submit_recipe(client_env(cluster, SBATCH_GPUS_PER_NODE="0", SBATCH_TIMELIMIT="9",
                                     SBATCH_ACCOUNT="other"),
                          "--hold", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1")
    fields = {job: job_fields(cluster, job) for job in (ours, plain)}
    cluster.run("scancel", str(ours), str(plain))
    expected = {
        ours: {"NumNodes": "2-2", "NumTasks": "2", "TimeLimit": "00:07:00", "Account": "proj", "Partition": "debug",
               "TresPerNode": "gres:gpu:0", "Requeue": "1", "JobName": "diffmoe-l-e8-flow",
               "StdOut": f"{tmp_path}/logs/diffmoe-l-e8-flow-{ours}.out"},
        plain: {"NumNodes": "2-2", "NumTasks": "2", "TimeLimit": "00:09:00", "Account": "other",
                "TresPerNode": "gres:gpu:0", "Requeue": "1", "JobName": "diffmoe-l-e8-flow"},
    }
    for job, wanted in expected.items():
        assert {key: fields[job].get(key) for key in wanted} == wanted


def start_straight_run(out_dir: Path) -> subprocess.Popen:
    """The same training without Slurm or preemption: torchrun, two ranks, one thread each. It runs beside the
    job (whose requeue leaves the cores idle for a while); its numbers do not depend on the company."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "pretrain_diffmoe.py", "--config", "configs/digits_diffmoe_e4_flow.yaml",
               "--set", f"train.out_dir={out_dir}"]
    for override in OVERRIDES:
        command += ["--set", override]
    return subprocess.Popen(command, cwd=REPO, env={**clean_env(), "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def straight_metrics(proc: subprocess.Popen, out_dir: Path) -> list[dict]:
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-6000:]
    return read_metrics(out_dir)


def last_step(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)


def test_l_e8_recipe_is_preempted_requeues_resumes_and_matches_a_straight_run(cluster, tmp_path):
    run_dir, log_dir = tmp_path / "run", tmp_path / "logs"
    straight = start_straight_run(tmp_path / "straight")
    job = submit_recipe(client_env(
        cluster, NODES="2", TASKS_PER_NODE="1", GPUS_PER_NODE="0", CPUS_PER_TASK="1", TIME="15", SIGNAL_LEAD="60",
        CONFIG="configs/digits_diffmoe_e4_flow.yaml", RUN_DIR=str(run_dir), LOG_DIR=str(log_dir),
        OVERRIDES=" ".join(OVERRIDES), PYTHON=sys.executable, OMP_NUM_THREADS="1"))
    log = log_dir / f"diffmoe-l-e8-flow-{job}.out"
    deadline = time.time() + 300
    while last_step(run_dir) < 6:
        assert not cluster.job_state(job).finished, log.read_text()
        assert time.time() < deadline, f"no progress:\n{log.read_text() if log.exists() else ''}"
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", str(job))  # what --signal=USR1@... sends the steps
    cluster.wait_for(job, lambda state: state.restarts >= 1, timeout=120)
    final = cluster.wait_for(job, lambda state: state.finished, timeout=600)
    output = log.read_text()
    assert final.state == "COMPLETED" and final.restarts == 1, f"{final}\n{output}"

    stopped = int(re.search(r"stopped at step (\d+)", output).group(1))
    assert 6 <= stopped < STEPS
    for expected in (f"== job {job} (diffmoe-l-e8-flow) start 1 on n[1-2], 2 tasks, rendezvous 127.0.0.1:",
                     f"== saved after a stop signal: requeueing job {job}",
                     f"== job {job} (diffmoe-l-e8-flow) start 2 on n[1-2]",
                     f"resumed from {run_dir}/checkpoints/step_{stopped:08d} at step {stopped}",
                     "2 ranks (srun)", "== tasks exited with status 0"):
        assert expected in output, f"{expected!r} not in the job log:\n{output}"

    resumed, straight = read_metrics(run_dir), straight_metrics(straight, tmp_path / "straight")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for ours, theirs in zip(resumed, straight):
        for key in DETERMINED:
            assert ours[key] == theirs[key], f"step {ours['step']}: {key} {ours[key]} != {theirs[key]}"


def test_extraction_recipe_writes_latents_from_both_nodes(cluster, image_folder, vae_dir, tmp_path):
    latents, log_dir = tmp_path / "latents", tmp_path / "logs"
    job = submit_recipe(client_env(
        cluster, NODES="2", TASKS_PER_NODE="1", GPUS_PER_NODE="0", CPUS_PER_TASK="1", TIME="10", SIGNAL_LEAD="60",
        IMAGES=str(image_folder), DATA=str(latents), VAE=str(vae_dir), IMAGE_SIZE="16", SHARD_SIZE="5",
        LOG_DIR=str(log_dir), PYTHON=sys.executable, OMP_NUM_THREADS="1"), recipe="slurm/extract_latents.sbatch")
    final = cluster.wait_for(job, lambda state: state.finished, timeout=300)
    output = (log_dir / f"diffmoe-extract-latents-{job}.out").read_text()
    assert final.state == "COMPLETED", output
    index = json.loads((latents / "index.json").read_text())
    assert index["num_images"] == 12 and [s["count"] for s in index["shards"]] == [5, 5, 2]
    assert "rank 0: shard 0 (5 images" in output and "rank 1: shard 1 (5 images" in output


def test_evaluation_recipe_samples_over_two_nodes_requeues_when_stopped_and_scores_the_digits(cluster, trained,
                                                                                               tmp_path):
    out, log_dir = tmp_path / "eval", tmp_path / "logs"
    job = submit_recipe(client_env(
        cluster, NODES="2", TASKS_PER_NODE="1", GPUS_PER_NODE="0", CPUS_PER_TASK="1", TIME="10", SIGNAL_LEAD="60",
        WEIGHTS=str(trained / "ema.safetensors"), OUT=str(out), NUM_SAMPLES="40", BATCH_SIZE="8", EP="2", STEPS="4",
        DIFFMOE_FAULT="sigusr1@pool:1", DIFFMOE_FAULT_RANK="1",  # a stop notice after pool 1, in the first start only
        LOG_DIR=str(log_dir), PYTHON=sys.executable, OMP_NUM_THREADS="1"), recipe="slurm/evaluate.sbatch")
    cluster.wait_for(job, lambda state: state.restarts >= 1, timeout=300)
    final = cluster.wait_for(job, lambda state: state.finished, timeout=300)
    output = (log_dir / f"diffmoe-evaluate-{job}.out").read_text()
    assert final.state == "COMPLETED" and final.restarts == 1, output
    assert f"== saved after a stop signal: requeueing job {job}" in output and "16/40 samples there already" in output
    assert "2 tasks" in output and "wrote " in output
    scores = json.loads((out / "scores.txt").read_text().splitlines()[-1])
    assert scores["num_images"] == 40 and {"digit_fid", "digit_accuracy"} <= scores.keys()


def run_lib_sh(cluster, tmp_path: Path, task: str) -> tuple[int, Path]:
    """A job of 2 tasks on 2 nodes that runs `bash -c task` through slurm/lib.sh's submit_or_run, as the recipes do."""
    recipe, log = tmp_path / "recipe.sbatch", tmp_path / "job.out"
    recipe.write_text(f'#!/bin/bash\nset -euo pipefail\nREPO={REPO}\nJOB_NAME=lib-test\nsource "$REPO/slurm/lib.sh"\n'
                      f'submit_or_run bash -c {shlex.quote(task)}\n')
    job = cluster.submit(recipe, "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10", "--requeue",
                         f"--output={log}", "--open-mode=append", f"--chdir={tmp_path}",
                         env_overrides={"LOG_DIR": str(tmp_path / "logs")})
    return job, log


def test_a_rank_that_exits_with_an_error_ends_the_step(cluster, tmp_path):
    # Task 1 fails at once; task 0 would wait 10 minutes for it (as a rank waits in a collective).
    job, log = run_lib_sh(cluster, tmp_path, 'if [ "$SLURM_PROCID" = 1 ]; then exit 1; fi; exec sleep 600')
    final = cluster.wait_for(job, lambda state: state.finished, timeout=180)  # a guard, not a speed check
    assert final.state == "FAILED", f"{final}\n{log.read_text()}"
    assert "== tasks exited with status" in log.read_text()


def test_a_rank_that_saved_after_a_stop_requeues_even_if_srun_reports_another_killed(cluster, tmp_path):
    # Task 0 saved and exits 75; task 1 is still busy when srun ends the step (kill-on-bad-exit), so srun reports
    # the killed task's status, not 75: the rank's own report decides. The second start completes.
    report = (f'{shlex.quote(sys.executable)} -c "from diffmoe_scale.parallel.launcher import report_exit_status; '
              f'report_exit_status(75)"')
    job, log = run_lib_sh(cluster, tmp_path, f'if [ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ]; then exit 0; fi; '
                                             f'if [ "$SLURM_PROCID" = 0 ]; then {report}; exit 75; fi; exec sleep 600')
    cluster.wait_for(job, lambda state: state.restarts >= 1 or state.finished, timeout=180)
    final = cluster.wait_for(job, lambda state: state.finished, timeout=300)
    output = log.read_text()
    assert final.state == "COMPLETED" and final.restarts == 1, f"{final}\n{output}"
    assert f"== saved after a stop signal: requeueing job {job}" in output
    assert not (tmp_path / "logs" / "status").exists() or not any((tmp_path / "logs" / "status").iterdir())
