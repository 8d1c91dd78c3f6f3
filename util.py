"""What train.py and sample.py share: one-line errors, device choice, and the processes of a
torchrun run. (Checkpoint files are checkpoints.py's.)"""

import gc
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist


class UserError(Exception):
    """Bad input: printed as one line of cause and remedy, then the program exits with status 2."""


def fail(message):
    if message is not None:
        print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run(fn, cfg):
    """Call fn on the typed config (the dataclass) so that a UserError prints one line, not a
    traceback."""
    from omegaconf import OmegaConf

    # under torchrun every process meets the same error (same config, data and checkpoint; stops are
    # agreed on by all_reduce), so rank 0 alone prints it
    quiet = int(os.environ.get("RANK", "0")) > 0
    try:
        return fn(OmegaConf.to_object(cfg))
    except UserError as err:
        fail(None if quiet else err)
    except KeyboardInterrupt:  # before training started, or while sampling: nothing to save
        fail(None if quiet else "interrupted")


def check_overrides(config_name, args):
    """Compose the config once up front so that a bad override is reported in one line that names
    it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    # Hydra's own flags (--cfg job, --help, ...): Hydra handles them
    if any(a.startswith("-") for a in args):
        return
    parser = OverridesParser.create()
    for arg in args:
        try:
            parser.parse_override(arg)
        except HydraException:
            fail(f"cannot parse the override {arg!r}. Values with commas, spaces, brackets or "
                 "non-ASCII characters need quotes that reach Hydra, for example: "
                 "'prompt=\"Hello, world\"'")
    config_dir = str(Path(__file__).resolve().parent / "config")
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        try:
            compose(config_name, overrides=args)
        except (HydraException, OmegaConfBaseException) as err:
            # Hydra's cause lines without its indented details and its "+key" hint (the schema is
            # closed)
            text = f"{err}\n{err.__cause__ or ''}"
            text = text.split("Config search path")[0]
            lines = [s.strip() for s in text.splitlines()
                     if s.strip() and not s.startswith((" ", "To append"))]
            fail(f"{' '.join(lines)} (every key and its type: --cfg job)")


def pick_device(name="auto", key="train.device"):
    """cuda > mps > cpu, unless a device is named. key: the option that names the device, for the
    remedies."""
    # torch warns here about a too-old driver: a reason
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cuda = torch.cuda.is_available()
    if name == "auto":
        if cuda:
            return "cuda"
        # a GPU the user expects to train on, silently unused: say so instead
        if nvidia_gpu_present():
            raise UserError(unusable_gpu(key, caught))
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": cuda, "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        if device.type == "cuda" and nvidia_gpu_present():
            raise UserError(unusable_gpu(key, caught))
        raise UserError(f"device {name!r} is not available on this machine: use {key}=auto")
    return name


def nvidia_gpu_present():
    """An NVIDIA driver is loaded (or its nvidia-smi installed), unless CUDA_VISIBLE_DEVICES hides
    every GPU on purpose (empty or -1)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return False
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def unusable_gpu(key, caught=()):
    """One line: this machine has an NVIDIA GPU that this torch cannot use, why if torch said, and
    the remedies."""
    said = [str(w.message).split("(Triggered")[0].removeprefix("CUDA initialization:").strip()
            for w in caught
            if "driver" in str(w.message).lower() or "cuda" in str(w.message).lower()]
    said = f" (torch says: {said[0].splitlines()[0].split('. ')[0].rstrip('.')})" if said else ""
    if torch.version.cuda is None:
        return (f"this machine has an NVIDIA GPU, but the installed torch is a CPU-only "
                f"build{said}: install a CUDA build of torch, or pass {key}=cpu to run on the CPU "
                "knowingly")
    cuda = torch.version.cuda
    return (f"this machine has an NVIDIA GPU, but torch (built for CUDA {cuda}) cannot use "
            f"it{said}: update the NVIDIA driver to one that supports CUDA {cuda} (nvidia-smi "
            f"shows the CUDA version the driver supports), or install a torch build for the "
            f"driver's CUDA, or pass {key}=cpu to run on the CPU knowingly")


def sync(device):
    """Wait for the device's queued work, so that a timer reads the time it took (CUDA and MPS run
    ahead)."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()


class Processes:
    """
    The processes of a run: one (`uv run train.py`), or WORLD_SIZE under torchrun, each with its
    rank. Joins the process group: nccl on CUDA (LOCAL_RANK picks the GPU), gloo on CPU. Rank 0 is
    the master: it alone logs and writes files. Small flags travel over a gloo group on the CPU, so
    that checking one every step never waits for the GPU.
    """

    def __init__(self, device_name="auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = pick_device(device_name)
        if self.world == 1:
            return
        device_type = torch.device(self.device).type
        if device_type == "mps":
            raise UserError("several processes need a process-group backend, and none handles MPS "
                            "tensors: train in one process (uv run train.py) or pass "
                            "train.device=cpu")
        if device_type == "cuda":
            self.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(self.device)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        self.flags = dist.new_group(backend="gloo") if device_type == "cuda" else dist.group.WORLD

    @property
    def master(self):
        return self.rank == 0

    def any(self, flag):
        """True on every process if flag is true on any (one CPU all_reduce; free with one
        process)."""
        if self.world == 1:
            return flag
        t = torch.tensor(int(flag))
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.flags)
        return bool(t)

    def mean(self, t):
        """The mean of tensor t over the processes (a new tensor; t itself is left as it is)."""
        if self.world == 1:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t / self.world

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every process (plain data and CPU tensors)."""
        if self.world == 1:
            return [obj]
        objs = [None] * self.world
        dist.all_gather_object(objs, obj)
        return objs

    def close(self):
        if dist.is_initialized():
            # a DDP reducer left in a reference cycle goes now, not at exit after its group
            # (there, 3 runs in 20 aborted with 'terminate called ...')
            gc.collect()
            dist.destroy_process_group()
        self.flags = None  # no reference to a destroyed group lives on into the interpreter's exit
