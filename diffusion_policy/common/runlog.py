"""The trail a run leaves: config.json, metrics.jsonl, and wandb when asked for.

config.json holds the arguments, the command line, the git commit and package versions, and
is written before the long work starts. metrics.jsonl gets one JSON object per `log` call.
"""

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, is_dataclass
from importlib import metadata

import torch

from diffusion_policy.common.atomic import atomic_open, storage_errors
from diffusion_policy.common.runtime import UserError

WANDB_PROJECT = "pusht-adjoint-matching"  # unless $WANDB_PROJECT names another
WANDB_INIT_TIMEOUT_S = 20
PACKAGES = ("torch", "numpy", "gymnasium", "pymunk", "zarr", "diffusers", "wandb")


def git_commit():
    """HEAD of the repository this package lives in (-dirty with uncommitted changes), or None."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model():
    """The processor's model name (from /proc/cpuinfo where there is one), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(**extra):
    """This machine, precisely enough to tell results of other machines apart: the processor's model
    and architecture, cores, the torch version, the CPU kernels torch dispatches to (its capability,
    which $ATEN_CPU_CAPABILITY can lower), torch's threads, and the GPU if torch sees one; `extra`
    (such as how many jobs ran side by side) is added. "summary" says it in one line."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info = {"cpu_model": cpu_model(), "arch": platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "gpu": gpu, **extra}
    info["summary"] = (f"{info['cpu_model']} ({info['arch']}), {info['cores']} cores, torch {info['torch']} "
                       f"{info['cpu_capability']}, {info['threads']} threads, {gpu or 'no GPU'}")
    return info


def _versions():
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_info(args):
    """What config.json records: arguments, command, commit, versions, time."""
    return {
        "args": {k: (list(v) if isinstance(v, tuple) else asdict(v) if is_dataclass(v) else v)
                 for k, v in vars(args).items()},
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "git_commit": git_commit(),
        "machine": machine(),
        "versions": _versions(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _parses(line):
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def wandb_credentials():
    """Whether wandb has an API key: $WANDB_API_KEY, or a 'wandb login' entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        with open(netrc) as f:
            return "api.wandb.ai" in f.read()
    except OSError:
        return False


class RunLog:
    """Writes config.json at once; `log(metrics, step)` appends to metrics.jsonl (and wandb).

    enabled=False (ranks other than 0 under torchrun): records nothing, writes nothing."""

    def __init__(self, run_dir, args, wandb_mode="off", job=None,
                 resume=False, enabled=True, extra=None, resume_at=None):
        self.run_dir, self.enabled, self.wandb = run_dir, enabled, None
        self.info = {**run_info(args), "job": job, **(extra or {})}
        if not enabled:
            return
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")  # an earlier run's was refused or discarded
        rows = None
        if resume and resume_at is not None and os.path.exists(self.metrics_path):
            # rows logged after the state resumed from are redone by this run: drop the old ones
            with open(self.metrics_path) as f:
                lines = [line for line in f if line.strip()]
            if lines and not _parses(lines[-1]):  # a row cut short by the interruption: redone by this run
                lines = lines[:-1]
            bad = [i + 1 for i, line in enumerate(lines) if not _parses(line)]
            if bad:  # checked before anything is written
                raise UserError(f"{self.metrics_path} is damaged at line {bad[0]} (not JSON): repair or remove that "
                                "line and --resume again, or start over with --force")
            rows = [line for line in lines if json.loads(line).get("step", 0) <= resume_at]
        os.makedirs(run_dir, exist_ok=True)
        with atomic_open(os.path.join(run_dir, "config.json")) as f:
            json.dump(self.info, f, indent=2)
        if rows is not None:
            with atomic_open(self.metrics_path) as f:
                f.writelines(rows)
        if wandb_mode not in ("off", "online", "offline"):
            raise ValueError(f"--wandb must be off, online or offline, got {wandb_mode!r}")
        if wandb_mode == "online" and not wandb_credentials():
            print("warning: --wandb online but no wandb credentials (WANDB_API_KEY or 'wandb login'); logging "
                  f"offline under {run_dir}/wandb instead ('wandb sync' uploads it later)", file=sys.stderr)
            wandb_mode = "offline"
        if wandb_mode != "off":
            import wandb  # deferred: optional

            def init(mode):
                # a bounded wait for the server (wandb's own default is 90 s), then the offline fallback below
                return wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), job_type=job, mode=mode,
                                  dir=run_dir, config=self.info["args"], resume="allow" if resume else None,
                                  settings=wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT_S))

            try:
                self.wandb = init(wandb_mode)
            except Exception as e:  # no network, a refused key: the run goes on, logged offline
                if wandb_mode != "online":
                    raise
                print(f"warning: wandb online failed ({type(e).__name__}); logging offline under {run_dir}/wandb",
                      file=sys.stderr)
                self.wandb = init("offline")

    def log(self, metrics, step):
        if not self.enabled:
            return
        row = {"step": int(step), "time": round(time.time(), 3), **metrics}
        with storage_errors(self.metrics_path), open(self.metrics_path, "a") as f:  # a cut last line: see __init__
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=int(step))

    def log_videos(self, paths, key="videos", fps=10):
        if self.wandb is not None and paths:
            import wandb

            self.wandb.log({key: [wandb.Video(p, fps=fps, format="mp4") for p in paths]})

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
