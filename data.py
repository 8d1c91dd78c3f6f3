"""
Character-level data: load the text (downloading tiny Shakespeare if it is missing, or writing
another corpus that WRITERS knows), build the vocabulary, split 90/10 into train/val as nanoGPT
does, and draw random batches.
"""

import hashlib
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from util import UserError

REPO = Path(__file__).resolve().parent
SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                   "tinyshakespeare/input.txt")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


@dataclass
class DataConfig:
    data_path: str = "shakespeare.txt"  # relative paths: the working directory, else the repo root
    # a val text of its own (then all of data_path trains); null: data_path's last 10% validates
    val_path: Optional[str] = None
    batch_size: int = 32
    # context length: the only block size (model.block_size is copied from it)
    block_size: int = 128


def resolve_path(data_path):
    path = Path(data_path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO / path


def download_shakespeare(path):
    print(f"downloading tiny Shakespeare to {path}")
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r:
            raw = r.read()
    except OSError as err:
        raise UserError(f"{path} is missing and tiny Shakespeare could not be downloaded ({err}); "
                        f"copy it to {path} or pass data.data_path=FILE") from None
    if hashlib.sha256(raw).hexdigest() != SHAKESPEARE_SHA256:
        raise UserError("the downloaded tiny Shakespeare has the wrong sha256; copy a good copy to "
                        f"{path}")
    write_atomically(path, raw)


def write_atomically(path, raw):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(raw)
    tmp.replace(path)


# a data file's name -> write(path), what makes it when it is missing: tiny Shakespeare here; the
# research extras add theirs (dyck.py: dyck.txt; corpora.py: the fresh-data corpora)
WRITERS = {"shakespeare.txt": download_shakespeare}


def load_text(data_path):
    path = resolve_path(data_path)
    if not path.exists():
        if path.name not in WRITERS:
            raise UserError(f"data file {path} not found: pass data.data_path=FILE with a text "
                            "file")
        WRITERS[path.name](path)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"could not read {path} as UTF-8 text ({err}); pass "
                        "data.data_path=FILE") from None


class Vocab:
    """Characters <-> integer ids; the character list is saved in every checkpoint."""

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    def __len__(self):
        return len(self.chars)

    def encode(self, s):
        unknown = sorted({c for c in s if c not in self.stoi})
        if unknown:
            listed = " ".join(repr(c) for c in unknown)
            raise UserError(f"characters not in the vocabulary: {listed}; "
                            "use only characters from the training text")
        return [self.stoi[c] for c in s]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def train_val_split(ids):
    """The first 90% of the encoded text trains, the last 10% validates (as nanoGPT: comparable
    losses)."""
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:]


def val_text(data_path, val_path=None):
    """The val text of a run's data: val_path's text, else the last 10% of data_path's."""
    return load_text(val_path) if val_path else train_val_split(load_text(data_path))[1]


class Dataset:
    """The encoded text split into train (first 90%) and val (last 10%), or, given a val text of
    its own (data.val_path), all of text trains; the vocabulary is that of both."""

    def __init__(self, text, block_size, val_text=None):
        self.vocab = Vocab.from_text(text if val_text is None else text + val_text)
        ids = torch.tensor(self.vocab.encode(text), dtype=torch.long)
        if val_text is None:
            train, val = train_val_split(ids)
        else:
            train, val = ids, torch.tensor(self.vocab.encode(val_text), dtype=torch.long)
        self.splits = {"train": train, "val": val}
        self.block_size = block_size
        shortest = min(len(s) for s in self.splits.values())
        if block_size < 1 or shortest <= block_size:
            n_val = len(self.splits["val"])
            raise UserError(f"data.block_size={block_size} does not fit the data (the val split "
                            f"has {n_val} characters); use a block size below {shortest}")

    def batch(self, split, batch_size, generator=None, device="cpu", rank=0, world=1):
        """
        Random windows x (B, T) and their next tokens y (B, T). With world processes each one draws
        the same batch_size windows (the generator advances alike everywhere) and keeps its own
        contiguous share of batch_size // world: the processes see different windows, and together
        exactly those of one process.
        """
        data = self.splits[split]
        ix = torch.randint(len(data) - self.block_size, (batch_size,), generator=generator)
        share = batch_size // world
        ix = ix[rank * share : (rank + 1) * share]
        offsets = ix[:, None] + torch.arange(self.block_size)  # (B, T)
        x, y = data[offsets], data[offsets + 1]
        if torch.device(device).type == "cuda":  # pinned memory lets the copy overlap the compute
            x, y = x.pin_memory(), y.pin_memory()
            return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return x.to(device), y.to(device)
