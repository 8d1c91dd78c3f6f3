"""What train.py and sample.py share: one-line errors, device choice, and safe checkpoints."""

import os
import sys
import warnings
from pathlib import Path

import torch


class UserError(Exception):
    """Bad input: printed as one line of cause and remedy, then the program exits with status 2."""


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run(fn, cfg):
    """Call fn on the typed config (the dataclass) so that a UserError prints one line, not a traceback."""
    from omegaconf import OmegaConf

    try:
        return fn(OmegaConf.to_object(cfg))
    except UserError as err:
        fail(err)
    except KeyboardInterrupt:  # before training started, or while sampling: nothing to save
        fail("interrupted")


def check_overrides(config_name, args):
    """Compose the config once up front so that a bad override is reported in one line that names it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if any(a.startswith("-") for a in args):  # Hydra's own flags (--cfg job, --help, ...): Hydra handles it
        return
    parser = OverridesParser.create()
    for arg in args:
        try:
            parser.parse_override(arg)
        except HydraException:
            fail(f"cannot parse the override {arg!r}. Values with commas, spaces, brackets or non-ASCII "
                 "characters need quotes that reach Hydra, for example: 'prompt=\"Hello, world\"'")
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent / "config"), version_base="1.3"):
        try:
            compose(config_name, overrides=args)
        except (HydraException, OmegaConfBaseException) as err:
            # Hydra's cause lines without its indented details and its "+key" hint (the schema is closed)
            text = f"{err}\n{err.__cause__ or ''}"
            text = text.split("Config search path")[0]
            lines = [s.strip() for s in text.splitlines() if s.strip() and not s.startswith((" ", "To append"))]
            fail(f"{' '.join(lines)} (every key and its type: --cfg job)")


def pick_device(name="auto"):
    """cuda > mps > cpu, unless a device is named."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise UserError(f"device {name!r} is not available on this machine: use train.device=auto")
    return name


def save_checkpoint(obj, path):
    """Write atomically: a temp file, then a rename, so a kill mid-save leaves the old file whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """Load tensors and plain data only (weights_only): a checkpoint holding code is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: train one first (uv run train.py) or pass checkpoint=PATH")
    try:
        with warnings.catch_warnings():  # torch warns about old pickle formats before refusing them
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types here; all mean "unusable file"
        if "weights_only" in str(err) or "Weights only" in str(err):
            raise UserError(f"checkpoint {path} holds objects other than tensors and plain data; "
                            "refusing to load it (only load checkpoints written by train.py)") from None
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}); "
                        "use another one, e.g. best.pt or ckpt.pt beside it") from None
    required = {"model", "config", "vocab", "step"}
    if not isinstance(ckpt, dict) or not required <= ckpt.keys():
        raise UserError(f"checkpoint {path} is not a nanoEBM checkpoint (it lacks {sorted(required)}); "
                        "pass one written by train.py")
    return ckpt
