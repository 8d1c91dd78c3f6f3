"""
A bidirectional Energy-Based Transformer for puzzles on a grid (Sudoku: sudoku.py), and the one-pass
transformer it is measured against: the model side of the study of where thinking should pay
(sudoku_study.py, docs/sudoku.md).

The energy of a relaxed candidate grid p (cells, N): every cell is fed its given digit (0: blank), its
position and its candidate's embedding, EBT's bias-free Linear(N -> d) of p; model.py's blocks run
over all cells with full attention (a cell sees the whole grid, not a prefix); the energy is the sum
of the cells' readouts, one scalar per puzzle. Thinking descends every cell's candidate jointly with
ebm.think and ebm's step rules (ebm.ebt_step: z <- p - alpha dE/dp; or ebm.free_energy_step), as
EBT's S1 recipe trains it: a noise start, K steps, a learned alpha, the candidate detached between
steps, the cross-entropy of every step's prediction averaged. The one-pass transformer is the same
network with no candidate and a head of N logits per cell.
"""

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from torch.nn import functional as F

import ebm
from model import Block, ModelConfig, RMSNorm


@dataclass
class GridConfig:
    size: int = 6  # the grid is size x size cells, digits 1..size
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    energy: bool = True  # False: the one-pass transformer (a head of logits per cell)
    think_rule: str = "ebt"  # ebt | free_energy (ebm's step rules)
    think_steps: int = 2  # K while training (S1: 2)
    think_lr: float = 1.0  # alpha (the EBT rule) or eta (the free-energy rule), learned
    entropy_weight: float = 0.0  # tau of the free-energy rule


def full_attention(attn, x):
    """Self-attention of every cell to every cell through a block's weights (model.py's
    CausalSelfAttention without its mask): written out, so that double backward works on every
    device, and without positions (the cells have learned position embeddings)."""
    B, T, C = x.shape
    hs = C // attn.n_head
    q, k, v = attn.c_attn(x).view(B, T, 3, attn.n_head, hs).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hs), dim=-1)  # (B, nh, T, T)
    return attn.c_proj((w @ v).transpose(1, 2).reshape(B, T, C))


class GridNet(nn.Module):
    """The transformer over a grid's cells: E(givens, p) (energy=True) or one-pass logits."""

    def __init__(self, config: GridConfig):
        super().__init__()
        self.config = config
        N, d = config.size, config.n_embd
        block = ModelConfig(n_layer=config.n_layer, n_head=config.n_head, n_embd=d)
        self.wte = nn.Embedding(N + 1, d)  # the given digit of a cell, 0 = blank
        self.wpe = nn.Embedding(N * N, d)  # the cell's position
        self.h = nn.ModuleList([Block(block) for _ in range(config.n_layer)])
        self.ln_f = RMSNorm(d)
        if config.energy:
            self.cand_proj = nn.Linear(N, d, bias=False)  # EBT's map from p to the cell's input
            self.step_embed = nn.Embedding(config.think_steps, d)  # one landscape per step
            self.readout = nn.Linear(d, 1, bias=False)
            self.log_lr = nn.Parameter(torch.tensor(math.log(config.think_lr)))
        else:
            self.head = nn.Linear(d, N, bias=False)
        self.apply(init_weights)

    def embed(self, givens):
        """The cells' inputs (B, T, d) from the givens (B, T): digit and position."""
        return self.wte(givens) + self.wpe.weight

    def trunk(self, x):
        """model.py's blocks with full attention, then the final norm: (..., T, d) -> (..., T, d)."""
        lead, x = x.shape[:-2], x.reshape(-1, *x.shape[-2:])
        for block in self.h:
            x = x + full_attention(block.attn, block.ln_1(x))
            x = x + block.mlp(block.ln_2(x))
        return self.ln_f(x).view(*lead, *x.shape[-2:])

    def logits(self, givens):
        """The one-pass prediction: logits (B, T, N) of every cell's digit."""
        return self.head(self.trunk(self.embed(givens)))

    def energy(self, base, p, step=None):
        """E (..., B) of candidate grids p (..., B, T, N) for the embedded givens base (B, T, d);
        step: the think step, for its embedding (None or past the trained steps: the last)."""
        last = self.step_embed.num_embeddings - 1
        k = last if step is None else min(step, last)
        x = base + self.cand_proj(p) + self.step_embed.weight[k]
        return self.readout(self.trunk(x)).squeeze(-1).sum(-1)  # the sum of the cells' readouts

    def energy_fn(self, givens):
        """energy(p, step) -> (E (..., B), dE/dp (..., B, T, N)) for givens (B, T), the form
        ebm.think descends; dE/dp keeps its graph while gradients are on (training through it)."""
        base = self.embed(givens)

        def energy(p, step=None):
            create_graph = torch.is_grad_enabled()
            with torch.enable_grad():
                if not p.requires_grad:
                    p = p.detach().requires_grad_()
                E = self.energy(base, p, step)
                (dE_dp,) = torch.autograd.grad(E.sum(), p, create_graph=create_graph)
            return E, dE_dp

        return energy

    def step_rule(self):
        """The think step, chosen once: ebm's EBT rule or free-energy rule at the learned step."""
        lr = self.log_lr.exp()
        if self.config.think_rule == "ebt":
            return partial(ebm.ebt_step, lr=lr)
        return partial(ebm.free_energy_step, lr=lr, tau=self.config.entropy_weight)

    def think(self, givens, steps, starts=1, generator=None):
        """Think `steps` steps from `starts` noise starts per puzzle: [z_0, ..., z_K], each
        (starts, B, T, N). While training every step starts from a detached candidate (S1)."""
        B, T = givens.shape
        z = torch.randn(starts, B, T, self.config.size, generator=generator,
                        dtype=self.wpe.weight.dtype, device=givens.device)
        return ebm.think(z, self.energy_fn(givens), steps, self.step_rule(), detach=self.training)


def init_weights(module):
    """Xavier-uniform linear layers and N(0, 0.02) embeddings, as model.py's GPT."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


def loss(net, givens, solutions):
    """The training loss of a batch: cross-entropy on the blank cells, of the one-pass logits or
    averaged over the K think steps' predictions (EBT's S1)."""
    blank = givens == 0
    target = (solutions - 1)[blank]

    def ce(z):
        return F.cross_entropy(z[blank], target)

    if not net.config.energy:
        return ce(net.logits(givens))
    zs = net.think(givens, net.config.think_steps)
    return torch.stack([ce(z[0]) for z in zs[1:]]).mean()


@torch.no_grad()
def solve(net, givens, steps=None, starts=1, generator=None, verifier=None):
    """
    Predicted grids (B, T) of digits 1..N, the givens kept. One-pass: the argmax of the logits.
    EBT: think `steps` steps (default: the trained K) from `starts` noise starts and keep, per
    puzzle, the candidate of lowest energy (self-verification), or with verifier(givens, grids
    (B, M, T)) -> bool (B, M) the first that it accepts (the exact verifier as an oracle; else the
    lowest energy).
    """
    if not net.config.energy:
        grid = net.logits(givens).argmax(-1) + 1
        return torch.where(givens > 0, givens, grid)
    zs = net.think(givens, net.config.think_steps if steps is None else steps, starts, generator)
    energy = net.energy_fn(givens)
    E = energy(F.softmax(zs[-1], -1))[0]  # (M, B): the last step's landscape
    grids = torch.where(givens > 0, givens, zs[-1].argmax(-1) + 1).transpose(0, 1)  # (B, M, T)
    pick = E.argmin(0)  # (B,)
    if verifier is not None:
        ok = verifier(givens, grids)  # (B, M)
        pick = torch.where(ok.any(-1), ok.float().argmax(-1), pick)
    return grids[torch.arange(len(pick)), pick]
