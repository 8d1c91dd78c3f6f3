"""
Checkpoint files: written atomically, loaded safely (tensors and plain data only); a training run's
out_dir/ckpt.pt (resumable), best.pt and final.pt; and, for sample.py, eval.py, study.py and viz.py,
a trained model (or a product of experts) loaded from its checkpoint.
"""

import os
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

from data import Vocab
from engine import Run, RunConfig
from model import GPT, ModelConfig
from util import UserError

# what a resumed run must share with the checkpoint; any other change (a loss weight, a think
# option, the learning rate, max_steps) is allowed and printed as a note (model.block_size and
# model.vocab_size follow data.block_size and the vocabulary, checked beside these)
ARCHITECTURE = ("n_layer", "n_head", "n_embd", "energy", "mixture_hidden", "think_lr_learnable",
                "cand_embed", "think_step_embed")


def save_checkpoint(obj, path):
    """Write atomically: a temp file, then a rename, so a kill mid-save leaves the old file
    whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """Load tensors and plain data only (weights_only): a checkpoint holding code is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: train one first (uv run train.py) or pass "
                        "checkpoint=PATH")
    try:
        with warnings.catch_warnings():  # torch warns about old pickle formats before refusing them
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types here; all mean "unusable file"
        if "weights_only" in str(err) or "Weights only" in str(err):
            raise UserError(f"checkpoint {path} holds objects other than tensors and plain data; "
                            "refusing to load it (only load checkpoints written by "
                            "train.py)") from None
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}); "
                        "use another one, e.g. best.pt or ckpt.pt beside it") from None
    required = {"model", "config", "vocab", "step"}
    if not isinstance(ckpt, dict) or not required <= ckpt.keys():
        raise UserError(f"checkpoint {path} is not a nanoEBM checkpoint (it lacks "
                        f"{sorted(required)}); pass one written by train.py")
    # learned positions: only the GPT-2 block had them
    if "transformer.wpe.weight" in ckpt["model"]:
        raise UserError(f"checkpoint {path} holds the earlier GPT-2-block model (learned "
                        "positions, LayerNorm, GELU), which this version replaced by a Llama-style "
                        "block (docs/parity.md): retrain it")
    return ckpt


class Checkpoints:
    """
    out_dir/ckpt.pt (resumable: optimizer, RNG states and chain state of every process), best.pt and
    final.pt. Every process calls save at the same step (ckpt.pt gathers their state); rank 0
    writes.
    """

    def __init__(self, cfg: RunConfig, procs, run: Run):
        self.cfg, self.procs, self.model = cfg, procs, run.model
        self.optimizer, self.state, self.scaler = run.optimizer, run.state, run.scaler
        self.batch_gen, self.vocab = run.batch_gen, run.data.vocab
        self.dir = Path(cfg.out_dir)
        device_type = next(run.model.parameters()).device.type
        # the device's own RNG (dropout, think noise and chains draw from it on CUDA and MPS):
        # "cuda" or "mps", whose torch modules both have get_rng_state / set_rng_state
        self.device_rng = device_type if device_type in ("cuda", "mps") else None

    def save(self, kind, step, best_val, elapsed):
        # per process: its RNG states and chain state (PCD chains, fast weights, replay)
        if kind == "ckpt.pt":
            own = {"torch": torch.get_rng_state()}
            if self.device_rng:
                own[self.device_rng] = getattr(torch, self.device_rng).get_rng_state()
            if self.state is not None:
                own["chains"] = {k: v.cpu() if torch.is_tensor(v) else v
                                 for k, v in self.state.state_dict().items()}
            ranks = self.procs.gather(own)
        if not self.procs.master:
            return
        ckpt = {"model": self.model.state_dict(),
                "config": OmegaConf.to_container(OmegaConf.structured(self.cfg)),
                "vocab": self.vocab.chars, "step": step, "best_val": best_val,
                "processes": self.procs.world}  # tokens: step x batch x block x accum x this
        # everything needed to continue the run exactly; entry r of each list: rank r
        if kind == "ckpt.pt":
            ckpt["optimizer"] = self.optimizer.state_dict()
            ckpt["rng"] = {"batch": self.batch_gen.get_state(),
                           "torch": [r["torch"] for r in ranks]}
            if self.device_rng:
                ckpt["rng"][self.device_rng] = [r[self.device_rng] for r in ranks]
            if self.state is not None:
                ckpt["chains"] = [r["chains"] for r in ranks]
            if self.scaler is not None:
                ckpt["scaler"] = self.scaler.state_dict()
            ckpt["elapsed"] = elapsed
        save_checkpoint(ckpt, self.dir / kind)

    def resume(self):
        """Load ckpt.pt into the run; returns (step, best_val, elapsed) to continue from."""
        path, procs = self.dir / "ckpt.pt", self.procs
        ckpt = load_checkpoint(path, map_location=next(self.model.parameters()).device)
        self.check_compatible(ckpt, path)
        if not isinstance(ckpt.get("rng", {}).get("torch"), list):
            raise UserError(f"{path} has no per-process state (an older train.py wrote it); "
                            "start a new run without train.resume")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        rng, saved = ckpt["rng"], len(ckpt["rng"]["torch"])
        # rank r continues the RNG and chains of rank r (one process: those of rank 0)
        if procs.rank < saved:
            # (map_location moved them to the device)
            torch.set_rng_state(rng["torch"][procs.rank].cpu())
            if self.device_rng in rng:
                device_rng = rng[self.device_rng][procs.rank].cpu()
                getattr(torch, self.device_rng).set_rng_state(device_rng)
            if self.state is not None and "chains" in ckpt:
                self.state.load_state_dict(ckpt["chains"][procs.rank])
        self.batch_gen.set_state(rng["batch"].cpu())
        if procs.master:
            print(f"resuming from {path} at step {ckpt['step']}")
            if procs.world > saved:
                print(f"note: ckpt.pt holds the state of {saved} processes; processes {saved}.. "
                      "start new RNG streams and chains")
        return ckpt["step"], ckpt["best_val"], ckpt["elapsed"]

    def check_compatible(self, ckpt, path):
        """Architecture, vocabulary and data must match the checkpoint; other changes are printed as
        notes."""
        old, new = ckpt["config"], OmegaConf.to_container(OmegaConf.structured(self.cfg))
        fixed = [f"model.{k}" for k in ARCHITECTURE if old["model"].get(k) != new["model"][k]]
        if (new["model"]["think_step_embed"]
                and old["model"].get("think_steps") != new["model"]["think_steps"]):
            fixed.append("model.think_steps")  # one step embedding per step
        fixed += [f"data.{k}" for k in ("data_path", "val_path", "block_size")
                  if old["data"].get(k) != new["data"][k]]
        if fixed or ckpt["vocab"] != self.vocab.chars:
            raise UserError(f"{path} was trained with another {', '.join(fixed) or 'vocabulary'}; "
                            "resume with the same architecture and data, or drop train.resume")
        changed = [f"{group}.{k}={new[group][k]} (was {old[group].get(k)})"
                   for group in ("model", "data", "train")
                   for k in new[group] if k != "resume" and old[group].get(k) != new[group][k]]
        if changed and self.procs.master:
            print("note: resuming with " + ", ".join(changed))


def load_model(path, device):
    """A GPT, its vocabulary and the run's config from any checkpoint train.py wrote
    (final/best/ckpt.pt)."""
    ckpt = load_checkpoint(path, map_location=device)
    try:
        config = OmegaConf.merge(OmegaConf.structured(ModelConfig), ckpt["config"]["model"])
        model = GPT(OmegaConf.to_object(config))
        model.load_state_dict(ckpt["model"])
    except Exception as err:
        raise UserError(f"checkpoint {path} does not fit this version of nanoEBM "
                        f"({str(err).splitlines()[0]}); retrain it with this version") from None
    return model.to(device).eval(), Vocab(ckpt["vocab"]), ckpt["config"]


def load_experts(paths, weights, device):
    """
    The models of a product of experts (sample.py and eval.py: experts=[a.pt,b.pt]
    expert_weights=[1,0.5]), their weights (none given: 1 each), the one vocabulary they share and
    the first one's run config. Their energies add token by token, so every expert must have the
    same character list; block sizes and architectures may differ.
    """
    if not paths:
        raise UserError("experts is empty: pass at least one checkpoint, e.g. "
                        "experts='[a.pt,b.pt]'")
    if weights and len(weights) != len(paths):
        raise UserError(f"expert_weights has {len(weights)} entries for {len(paths)} experts: give "
                        "one weight per expert, or none (1 each)")
    loaded = [load_model(path, device) for path in paths]
    vocab = loaded[0][1]
    for path, (_, other, _) in zip(paths[1:], loaded[1:]):
        if other.chars != vocab.chars:
            raise UserError(f"the experts' vocabularies differ ({paths[0]}: "
                            f"{vocab_summary(vocab, other)}; {path}: "
                            f"{vocab_summary(other, vocab)}): energies add token by token, so "
                            "combine only models trained on text with the same characters")
    return [m for m, _, _ in loaded], list(weights) or [1.0] * len(paths), vocab, loaded[0][2]


def vocab_summary(vocab, other):
    """How vocab differs from other, in a few words: its size and the characters only it has."""
    only = [c for c in vocab.chars if c not in other.stoi]
    if not only:
        order = "" if len(vocab) < len(other) else ", in another order"
        return f"{len(vocab)} characters" + order
    return f"{len(vocab)} characters, {len(only)} only here: {' '.join(repr(c) for c in only[:8])}"
