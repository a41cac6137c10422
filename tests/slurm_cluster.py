"""A real single-node Slurm on this machine for the tests of run_all.sh --slurm: the `slurm` fixture starts munged,
slurmctld and slurmd (Debian's slurm-wlm) as children of pytest, with their config, state and logs in a temp folder.
Read this when a Slurm test skips or cannot start; docs/slurm.md has the timings and pitfalls."""

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

# Slurm's defaults suit big clusters; the commented lines make a one-node test cluster schedule and requeue in seconds
SLURM_CONF = """\
ClusterName=pytest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
ReturnToService=2
# a requeued job waits cred_expire seconds (default 120, at least 5), then for a full scheduling pass (default 60 s)
AuthInfo=socket={munge}/munge.socket,cred_expire=5
SchedulerParameters=sched_interval=1
# memory not consumable: the default CR_Core_Memory gives a job without --mem the whole node, one job at a time
SelectTypeParameters=CR_CPU
# as on strict sites: only a job submitted with --requeue may requeue itself
JobRequeue=0
# TERM to KILL when a job is cancelled or reaches its limit (default 30 s)
KillWait=5
# no error lines in the logs for the missing PMIx library and mail program
MpiDefault=none
MailProg=/bin/true
# the node as written here, even where slurmd counts its sockets and cores differently
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
DAEMONS = ("munged", "slurmctld", "slurmd")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
SBIN = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"  # the daemons, off a non-root PATH


class Slurm:
    """The running cluster: `env` for subprocesses (SLURM_CONF), `folder` with slurm.conf and the daemons' logs."""

    def __init__(self, folder, env):
        self.folder, self.env = folder, env

    def __call__(self, *command):
        """A Slurm command's stdout; a failure raises with its stderr."""
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=30)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()}")
        return done.stdout.strip()

    def sbatch(self, *args):
        """Submits, -> the job id (of the array, for an array job)."""
        return self("sbatch", "--parsable", *args).split(";")[0]

    def states(self, job):
        """{job or array task id ('12_0'): state}, finished ones too (slurmctld keeps them MinJobAge seconds)."""
        lines = self("squeue", "--array", "--states=all", "--noheader", "--format=%i %T", f"--jobs={job}")
        return dict(line.split() for line in lines.splitlines())

    def wait(self, job, until=ENDED, timeout=60):
        """Polls until every task of `job` is in one of the states `until` (by default: has ended), -> {id: state}."""
        deadline = time.monotonic() + timeout
        while not ((states := self.states(job)) and set(states.values()) <= set(until)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job} still {states} after {timeout} s (daemon logs in {self.folder})")
            time.sleep(0.2)
        return states


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _succeeds(command, env=None):
    return subprocess.run(command, shell=True, env=env, capture_output=True).returncode == 0


def _wait_until(check, what, folder, daemons, timeout=30):
    deadline = time.monotonic() + timeout
    while not check():
        ended = [Path(process.args[0]).name for process in daemons if process.poll() is not None]
        if ended or time.monotonic() > deadline:
            why = f"{' and '.join(ended)} ended" if ended else f"not within {timeout} s"
            tails = "".join(f"\n--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-10:])
                            for log in sorted(folder.glob("*.log")))  # fmt: skip
            raise RuntimeError(f"waiting for {what}: {why}{tails}")
        time.sleep(0.2)


@contextlib.contextmanager
def single_node_slurm(folder):
    """munged, slurmctld and slurmd with their files in `folder` (munge's in a folder of its own), -> Slurm; at exit
    cancels every job and ends the daemons."""
    # munged runs as the munge user, which cannot enter pytest's root-only temp folders, and wants its socket's folder
    # open to all but writable by munge alone
    munge = Path(tempfile.mkdtemp(prefix="pytest-munge-"))
    munge.chmod(0o755)
    key = munge / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o600)
    for path in (munge, key):
        shutil.chown(path, "munge", "munge")
    host = socket.gethostname().split(".")[0]
    mem_mib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20  # RealMemory: nine tenths of it
    cpus = max(2, len(os.sched_getaffinity(0)))  # at least 2: the tests run two tasks side by side
    conf = folder / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, ctld_port=_free_port(), slurmd_port=_free_port(), munge=munge,
                                      folder=folder, cpus=cpus, memory=mem_mib * 9 // 10))  # fmt: skip
    (folder / "state").mkdir()
    (folder / "spool").mkdir()
    env = {**os.environ, "SLURM_CONF": str(conf)}
    slurm, daemons = Slurm(folder, env), []

    def start(name, *args, **kwargs):
        # in the foreground (-D, -F) they stay our children, to end and wait for; their logs go to NAME.log
        with open(folder / f"{name}.log", "w") as log:
            command = [shutil.which(name, path=SBIN), *args]
            daemons.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, **kwargs))

    try:
        start("munged", "--foreground", f"--socket={munge}/munge.socket", f"--key-file={key}",
              f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed",
              user="munge", group="munge")  # fmt: skip
        _wait_until(lambda: _succeeds(f"munge -n -S {munge}/munge.socket | unmunge -S {munge}/munge.socket"),
                    "munge -n | unmunge", folder, daemons)  # fmt: skip
        start("slurmctld", "-D", "-f", str(conf))
        start("slurmd", "-D", "-f", str(conf), "-N", host)
        _wait_until(lambda: _succeeds("sinfo --noheader --format=%T | grep -qx idle", env), "the node idle in sinfo",
                    folder, daemons)  # fmt: skip
        yield slurm
    finally:
        if len(daemons) == len(DAEMONS):
            _succeeds("scancel --me", env)
            with contextlib.suppress(RuntimeError):  # a job that will not die must not keep the daemons up
                _wait_until(lambda: _succeeds('test -z "$(squeue --noheader --me)"', env), "the queue empty", folder,
                            daemons)  # fmt: skip
        for process in reversed(daemons):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(munge, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A single-node Slurm for the session, -> Slurm. Skips where Slurm is not installed or cannot start, but fails
    there when REQUIRE_SLURM=1 (CI)."""
    unavailable = pytest.fail if os.environ.get("REQUIRE_SLURM") == "1" else pytest.skip
    missing = [name for name in (*DAEMONS, "sbatch") if not shutil.which(name, path=SBIN)]
    if missing:
        unavailable(f"Slurm is not installed ({', '.join(missing)} not found): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        unavailable("the test Slurm needs root (it runs munged as the munge user and slurmd as root)")
    with contextlib.ExitStack() as stack:
        try:
            cluster = stack.enter_context(single_node_slurm(tmp_path_factory.mktemp("slurm")))
        except Exception as error:
            unavailable(f"the test Slurm did not start: {error}")
        yield cluster
