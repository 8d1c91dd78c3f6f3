"""
The character-level GPT behind nanoEBM, read top to bottom like nanoGPT's model.py: the config, the
blocks (RMSNorm, rotary positions, attention, MLP, Block, the KV cache), the GPT with a linear
energy head in place of lm_head, and at the end the candidate slots of the transformer energy
(EBT). What the energies are used for (thinking, losses) lives in ebm.py.

The block is Llama's as the reference EBT code builds it: RMSNorm, rotary positions, a gated
(SwiGLU) MLP as wide as the stream, no biases, Xavier init. At 4 layers x 128 it learns 0.19 nats
better than GPT-2's block in the same steps, and faster per step; rotary positions and the init
carry most of it (docs/parity.md).
"""

import math
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class ModelConfig:
    # The keys model.* of the command line, set by name only (nothing builds this positionally).
    # Renaming one would break the predecessor's command lines (seeds/001) and old checkpoints.

    # architecture
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    vocab_size: int = 0  # set from the data at train time (0 = not yet known)
    block_size: int = 0  # copied from data.block_size at train time (the only block size)

    # the energy and the default thinking (ebm.py): K steps on z of F(z) = <p, e> - tau * H(p)
    energy: str = "linear"  # linear | mixture | transformer: the energy of a candidate next token
    softmax_temperature: float = 1.0  # System 1 logits z_0 = -e / T
    entropy_weight: float = 0.1  # tau in F(z) = <p, e> - tau * H(p)
    think_steps: int = 2  # K gradient steps on F per position
    refine_steps: Optional[int] = None  # the predecessor's name for think_steps (an alias)
    think_lr: float = 0.5  # eta, step size of a think step
    think_max_move: float = 0.25  # m, largest change of one logit in one step (free_energy rule)
    aux_ce_weight: float = 0.1  # weight of the System 1 cross-entropy in the training loss

    # thinking options
    # learn eta (in log space; its learning rate: train.think_lr_lr_mult)
    think_lr_learnable: bool = False
    think_clip: str = "hard"  # free_energy rule: hard = clamp to [-m, m]; smooth = m * tanh(x / m)
    think_steps_random: bool = False  # training: draw K uniformly from think_steps_min..think_steps
    think_steps_min: int = 1  # the fewest steps think_steps_random draws
    think_lr_jitter: float = 0.0  # training: multiply eta by U(1 - j, 1 + j) for each batch
    # self-verification: M candidates per position, keep the lowest verify_by: the energy E |
    # free_energy F = E - tau H (docs/results.md)
    think_samples: int = 1
    verify_by: str = "energy"

    # EBT's recipes (config/preset/ebt.yaml, ebt_s2.yaml; they set some of the keys above too)
    # free_energy: z <- z - clip(eta dF/dz) | ebt: z <- p - eta dE/dp (ebm.think)
    think_rule: str = "free_energy"
    think_start: str = "s1"  # where thinking starts: s1 (System 1 logits) | noise (N(0, 1)) | zeros
    # transformer energy: add a learned embedding of the step index to the slots
    think_step_embed: bool = False
    ce_all_steps: bool = False  # cross-entropy averaged over z_1..z_K instead of z_K only
    # detach the candidate between steps (each step learns on its own, EBT's S1)
    think_detach: bool = False
    think_truncate: bool = False  # backprop through the last think step only (earlier: detached)
    # training: eta per position uniform in [eta / s, eta * s] (EBT's S2); 1 = off
    think_lr_spread: float = 1.0
    think_noise: float = 0.0  # sigma, Langevin noise of the think steps while training
    # replay buffer: windows whose thinking output is kept to warm-start them (0 = off)
    replay_size: int = 0
    replay_frac: float = 0.25  # fraction of each training batch drawn from the replay buffer
    # transformer energy: candidate slots run through the top n blocks (0 = all)
    energy_layers: int = 1
    # transformer energy: candidate embedding p @ wte (wte) | bias-free Linear(V -> d) (linear)
    cand_embed: str = "wte"
    # transformer energy, training eager: the candidate slots keep for the double backward only what
    # their matmuls need and run the rest again (Recompute): about half the memory of an EBT step,
    # and on a CPU 40-60% more time (docs/speed.md). false: autograd keeps it all. Other energies
    # and compiled steps ignore it (a memory-for-time switch: bench.py passes it to every mode)
    recompute: bool = True

    # the mixture energy
    mixture_hidden: int = 128  # width of g in the mixture energy
    mixture_stopgrad: bool = True  # mixture: treat p inside g as a constant when backpropagating

    # contrastive divergence (contrastive.py: contrastive_loss)
    use_contrastive: bool = False
    contrastive_type: str = "cd"  # cd | pcd | fast_pcd
    contrastive_weight: float = 0.1
    contrastive_k: int = 4  # steps of each chain per training step (contrastive.sample_chains)
    contrastive_reg: float = 0.01  # weight of the energy-magnitude penalty E_pos^2 + E_neg^2
    # The langevin_* keys drive the contrastive chains' natural-gradient steps, not the think
    # loop's Langevin noise (that is think_noise). With a linear head the chains' logits close
    # (1 - step * tau)^k of their distance to -e / tau, so 4 steps of 0.5 leave 1/16 (eval.py's
    # chains part: KL ~0.01 nats).
    langevin_step_size: float = 0.5
    langevin_noise_scale: float = 0.005
    # the chains' tau; None = softmax_temperature (the model's own distribution)
    langevin_temperature: Optional[float] = None
    # PCD: windows whose chains persist (the replay buffer's size when replay_size = 0)
    n_persistent: int = 100
    pcd_reinit_prob: float = 0.05  # chance that a PCD chain (per position) restarts from noise
    fast_weight_lr: float = 0.05  # fast PCD: step of the fast weights
    fast_weight_decay: float = 0.95  # fast PCD: fast weights are multiplied by this every step


# --------------------------------------------------------------------------------------------------
# the blocks: RMSNorm, rotary positions, attention, MLP, Block, and the KV cache


class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without centring or bias."""

    def __init__(self, ndim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x):
        return rms_norm(x, self.weight)


def rms_norm(x, weight):
    """RMSNorm's x / rms(x) * weight over the last dim, the mean square in float32 even for bfloat16
    x."""
    if x.element_size() < 4:
        return F.rms_norm(x.float(), x.shape[-1:], eps=1e-5).type_as(x) * weight
    return F.rms_norm(x, x.shape[-1:], weight, 1e-5)


def rotary(head_size, length, base=10000.0):
    """
    The rotary tables (length, head_size) of rotate: position t turns pair (i, i + hs/2) by the
    angle t * base^(-2i / hs); cos repeats cos(angle) over both halves, sin is [sin, -sin](angle).
    """
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos().repeat(1, 2), torch.cat([angles.sin(), -angles.sin()], dim=-1)


def rotate(x, cos, sin):
    """
    Rotary positions: x (..., T, hs) with each pair (x_i, x_{i + hs/2}) turned by its position's
    angle, cos and sin (T, hs) from rotary. A query at t and a key at s turned so meet in q . k by
    the angle of t - s only: the attention sees relative positions, and nothing is added to the
    tokens. The roll swaps the halves: [x1, x2] -> [x1 cos + x2 sin, x2 cos - x1 sin].
    """
    return x * cos.to(x.dtype) + x.roll(x.size(-1) // 2, dims=-1) * sin.to(x.dtype)


def dropout(p):
    """A dropout layer where one is configured, else an identity: in generation a dropout layer at
    p = 0 still costs about 2 us a call on CPU, an identity 0.5, and a token passes nine."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.resid_dropout = dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, rope, cache=None):
        B, T, C = x.size()
        nh = self.n_head
        qkv = self.c_attn(x).view(B, T, 3 * nh, C // nh).transpose(1, 2)  # (B, 3 nh, T, hs)
        qk, v = qkv[:, : 2 * nh], qkv[:, 2 * nh :]  # (B, 2 nh, T, hs), (B, nh, T, hs)
        # queries and keys turned to their positions in one go (the cache holds turned keys)
        q, k = rotate(qk, *rope).chunk(2, dim=1)  # (B, nh, T, hs) each
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)  # (B, nh, past + T, hs)
        dropout_p = self.dropout if self.training else 0.0
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif T == 1:  # one new token sees every cached key: no mask (the common case in generation)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            # new query i sits at position past + i and may see keys 0..past + i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        # re-assemble all head outputs side by side
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """
    SwiGLU, n_embd wide: c_proj(silu(gate) * up), gate and up from one c_fc. With the gate a MLP as
    wide as the stream learns about as well as GPT-2's 4x wider GELU MLP here, in 2/3 of the step
    time (docs/parity.md).
    """

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(swiglu(self.c_fc(x))))


def swiglu(gate_up):
    """silu(gate) * up, gate and up the two halves of the last dim."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = RMSNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rope, cache=None):
        x = x + self.attn(self.ln_1(x), rope, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class LayerCache:
    """The KV cache of one attention layer: keys and values of the tokens seen so far, preallocated
    to block_size."""

    def __init__(self, config, batch_size, device, dtype):
        shape = (batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0

    def append(self, k, v):
        T = k.size(2)
        self.k.narrow(2, self.length, T).copy_(k)
        self.v.narrow(2, self.length, T).copy_(v)
        self.length += T
        return self.k.narrow(2, 0, self.length), self.v.narrow(2, 0, self.length)


# --------------------------------------------------------------------------------------------------
# the GPT: hidden states h_t, the linear energy head, the optimizer (AdamW, fused where it helps);
# the candidate slots of the transformer energy last


def fused_adamw(device_type):
    """
    Whether AdamW uses its fused kernel (one launch for every parameter) on this device type: on
    CUDA, and on MPS from torch 2.4, where it arrived. On CPU the default implementation stays, as
    the CPU figures were measured.
    """
    if device_type == "cuda":
        return True
    if device_type == "mps":
        return torch.__version__ >= "2.4"  # a TorchVersion: compared as a version, not as text
    return False


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.vocab_size > 0 and config.block_size > 0
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                drop=dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=RMSNorm(config.n_embd),
            )
        )
        # W_E (V x d, no bias): the energy of candidate token v at position t is
        # e_t[v] = (W_E h_t)[v]. Not tied to wte: the energy has the opposite sign of a logit, and
        # tying would fight that.
        self.energy_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.energy == "mixture":
            # g([h, ybar(p)]) -> scalar, and its weight beta. beta starts at 1 and g's output layer
            # is small but non-zero, so that g and beta both get gradients from the first step; g's
            # output has no bias (it would only shift E)
            self.mix_fc = nn.Linear(2 * config.n_embd, config.mixture_hidden)
            self.mix_proj = nn.Linear(config.mixture_hidden, 1, bias=False)
            self.mix_beta = nn.Parameter(torch.ones(()))
        if config.energy == "transformer":
            self.add_candidate_slots()
        if config.think_lr_learnable:
            self.think_log_lr = nn.Parameter(torch.tensor(math.log(config.think_lr)))
        # rotary angles of positions 0..block_size (the candidate slot of the last position sits one
        # past it); computed, not saved: checkpoints stay lean
        cos, sin = rotary(config.n_embd // config.n_head, config.block_size + 1)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # Xavier-normal matrices and N(0, 1) embeddings (the reference EBT code's init): 0.07 nats
        # better here than GPT-2's N(0, 0.02) (docs/parity.md). RMSNorm makes the embeddings' scale
        # harmless.
        if isinstance(module, nn.Linear):
            torch.nn.init.xavier_normal_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=1.0)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def rope(self, start, T):
        """The rotary tables cos and sin (T, hs) of positions start..start+T-1."""
        return self.rope_cos[start : start + T], self.rope_sin[start : start + T]

    def forward(self, idx, caches=None):
        """
        Hidden states h_t (B, T, d) for tokens idx (B, T); with caches, idx continues the cached
        tokens.
        """
        B, T = idx.size()
        start = caches[0].length if caches is not None else 0
        assert start + T <= self.config.block_size, (
            f"{start + T} tokens > block_size {self.config.block_size}"
        )
        # (B, T, d): no position embedding, positions enter the attention as rotations
        x = self.transformer.drop(self.transformer.wte(idx))
        rope = self.rope(start, T)  # positions start..start+T-1: a cache continues where it stopped
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, caches[i] if caches is not None else None)
        return self.transformer.ln_f(x)  # (B, T, d)

    def energies(self, h):
        """
        e_t = W_E h_t: one energy per candidate next token, (B, T, V). In float32 even under
        autocast (train.dtype): the think steps add small moves to logits and take softmaxes and
        logs of them, which bfloat16's 8 bits of mantissa would round away.
        """
        with torch.autocast(h.device.type, enabled=False):
            return self.energy_head(h.to(self.energy_head.weight.dtype))

    def think_lr(self):
        """eta: learned (log-parametrised, so it stays positive) or the configured constant."""
        return self.think_log_lr.exp() if self.config.think_lr_learnable else self.config.think_lr

    def new_caches(self, batch_size, device=None, dtype=None):
        """
        Empty KV caches for batch_size sequences, in the dtype the keys and values will have: the
        autocast dtype under autocast (a float32 cache would double the memory and cast every
        appended token).
        """
        w = self.energy_head.weight
        device = torch.device(device or w.device)
        if dtype is None:
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else w.dtype
        return [LayerCache(self.config, batch_size, device, dtype) for _ in self.transformer.h]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type,
                             think_lr_lr_mult=1.0):
        # every 2D tensor (matmuls, embeddings) decays; biases, norms and scalars do not; a learned
        # step size has its own group whose learning rate is think_lr_lr_mult times the others'
        params = [p for n, p in self.named_parameters() if p.requires_grad and n != "think_log_lr"]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if self.config.think_lr_learnable:
            groups.append(
                {"params": [self.think_log_lr], "weight_decay": 0.0, "lr_mult": think_lr_lr_mult}
            )
        fused = fused_adamw(device_type)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    # ----------------------------------------------------------------------------------------------
    # the transformer energy (EBT): candidate slots (energies.transformer_energy; their attention is
    # candidate_attention below the class)

    def add_candidate_slots(self):
        """
        The transformer energy's parameters: the energy readout, EBT's map from p to the slot
        (cand_embed=linear) and the step embeddings (think_step_embed).
        """
        config = self.config
        self.energy_readout = nn.Linear(config.n_embd, 1, bias=False)
        # E and dE/dp compiled for training (train.compile: energies.compile_dE_dp)
        self.compiled_dE_dp = None
        if config.cand_embed == "linear":  # EBT's vocab_to_embed: its own map from p to the slot
            self.cand_proj = nn.Linear(config.vocab_size, config.n_embd, bias=False)
        if config.think_step_embed:  # one energy landscape per step index (EBT's time embedding)
            self.step_embed = nn.Embedding(max(1, config.think_steps), config.n_embd)

    def candidate_embedding(self, p):
        """
        The embedding (..., d) of a relaxed candidate p (..., V): ybar(p) = p @ wte, or EBT's
        Linear(V -> d).
        """
        if self.config.cand_embed == "linear":
            return self.cand_proj(p)
        return p @ self.transformer.wte.weight

    def candidate_energy(self, cand, caches, step=None, recompute=False):
        """
        Scalar energies (..., Tc) of candidate embeddings cand (..., Tc, d) for the last Tc
        positions of the observed stream held in caches (its per-layer keys/values, computed once).
        The slot of position t is the candidate for x_{t+1} (with think_step_embed, plus the step's
        embedding) at x_{t+1}'s rotary position: a hypothetical next token, which sees x_0..x_t and
        itself. (Measured against a marker, x_t's position and the step as a prepended token:
        docs/parity.md.) With energy_layers = n > 0 the slots enter at the top n blocks only.
        step: the think step's index, for the step embedding; None and indices past the trained
        steps read the last step's landscape (as EBT does for extra steps). recompute: keep for the
        backward only what the slots' matmuls need (Recompute), for a loss that differentiates
        dE/dp again (training); off, autograd keeps it all, cheaper where one backward follows.
        """
        config = self.config
        Tc, L = cand.size(-2), caches[0].length
        c = cand
        if config.think_step_embed:
            last = self.step_embed.num_embeddings - 1
            c = c + self.step_embed.weight[last if step is None else min(step, last)]
        rope = self.rope(L - Tc + 1, Tc)  # the slot for x_{t+1} sits where x_{t+1} would
        first = config.n_layer - (config.energy_layers or config.n_layer)
        for block, cache in zip(self.transformer.h[first:], caches[first:]):
            c = candidate_block(block, c, cache, rope, recompute)
        c = recomputed(recompute, rms_norm, c, self.transformer.ln_f.weight)
        with torch.autocast(c.device.type, enabled=False):  # the energy in float32, as energies()
            return self.energy_readout(c.to(self.energy_readout.weight.dtype)).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# the transformer energy (EBT), continued: a block on the candidate slots, their attention, and what
# the double backward keeps
#
# Training differentiates dE/dp again (the loss reaches the weights through the think step), so
# autograd would keep every intermediate tensor of each slot pass and of its backward, per layer and
# per think step: the attention's (Tc, L) scores and weights three times over, and the elementwise
# intermediates of the RMSNorms and the SwiGLU, most of an EBT step's memory (docs/speed.md). The
# slots keep instead what their matmuls need (the inputs of c_attn, c_proj and c_fc, and in the
# backward the gradients at their outputs) and recompute the rest, elementwise work and the
# attention, in the backward and again in the double backward (Recompute): the same gradients, for
# the attention's matmuls run again (an S1 step at the default shape runs 17% more FLOPs than its
# math needs; eager on a CPU 40-60% more time, docs/speed.md). Only where a loss differentiates
# dE/dp again (recompute: the transformer energy's create_graph, unless model.recompute=false);
# where one backward follows (generation, evaluation) autograd's graph is cheaper. Under
# torch.compile (train.compile, generate(compile=True)) the compiler chooses what to keep.


def candidate_block(block, c, cache, rope, recompute=False):
    """A block on the candidate slots c (..., Tc, d): Block.forward with the slots' attention; with
    recompute its RMSNorms, SwiGLU and attention run again in the backward."""
    x = recomputed(recompute, rms_norm, c, block.ln_1.weight)
    c = c + candidate_attention(block.attn, x, cache, rope, recompute)
    gate_up = block.mlp.c_fc(recomputed(recompute, rms_norm, c, block.ln_2.weight))
    return c + block.mlp.dropout(block.mlp.c_proj(recomputed(recompute, swiglu, gate_up)))


def candidate_attention(attn, x, cache, rope, recompute=False):
    """
    The attention of candidate slots x (..., Tc, C) for the last Tc positions of the cached observed
    stream: the slot of position t sees observed keys 0..t and itself, nothing else. Leading dims of
    x broadcast over the cache. recompute: keep only its inputs for the backward.
    """
    *lead, Tc, C = x.shape
    qkv = attn.c_attn(x).view(*lead, Tc, 3 * attn.n_head, C // attn.n_head).transpose(-2, -3)
    L = cache.length
    K, V = cache.k[:, :, :L], cache.v[:, :, :L]  # (B, nh, L, hs) observed keys (turned) and values
    y = recomputed(recompute, partial(slot_attention, rope=rope), qkv, K, V)  # (..., nh, Tc, hs)
    y = y.transpose(-2, -3).reshape(*lead, Tc, C)
    return attn.resid_dropout(attn.c_proj(y))


def slot_attention(qkv, K, V, rope):
    """
    The slots' attention outputs (..., nh, Tc, hs) from their queries, keys and values qkv
    (..., 3 nh, Tc, hs) and the observed keys and values K, V (B, nh, L, hs). Written out (no fused
    kernel) so that double backward works on every device.
    """
    hs = qkv.size(-1)
    qk, v = qkv.split(2 * qkv.size(-3) // 3, dim=-3)  # (..., 2 nh, Tc, hs), (..., nh, Tc, hs)
    q, k = rotate(qk, *rope).chunk(2, dim=-3)  # (..., nh, Tc, hs) each, at the slots' own positions
    # scaled here, not in the (Tc, L) scores: one big elementwise op fewer each way
    q = q / math.sqrt(hs)
    Tc, L = q.size(-2), K.size(-2)
    # the observed keys past t hidden; the scores at least in float32 (as softmax under autocast):
    # adding the float32 mask promotes bfloat16
    hidden = torch.full((Tc, L), float("-inf"), device=q.device).triu(diagonal=L - Tc + 1)
    att_obs = q @ K.transpose(-2, -1) + hidden  # (..., nh, Tc, L)
    att_self = (q * k).sum(-1, keepdim=True).to(att_obs.dtype)  # (..., nh, Tc, 1)
    # softmax over [observed keys, itself] without concatenating the two: a cat and its slicing
    # backward would each copy or zero-fill the whole (Tc, L + 1) matrix in the backward and the
    # double backward
    # the running max cancels out of the quotient: no gradient through it
    top = torch.maximum(att_obs.amax(-1, keepdim=True), att_self).detach()
    w_obs, w_self = (att_obs - top).exp(), (att_self - top).exp()
    return (w_obs @ V + w_self * v) / (w_obs.sum(-1, keepdim=True) + w_self)


def recomputed(on, fn, *xs):
    """fn(*xs), keeping only xs for the backward if on (Recompute); under torch.compile fn(*xs)
    itself."""
    if on and not torch.compiler.is_compiling():
        return Recompute.apply(fn, *xs)
    return fn(*xs)


class Recompute(torch.autograd.Function):
    """
    y = fn(*xs) that keeps only its inputs xs for the backward, which runs fn again (activation
    checkpointing), under the autocast of the forward. The backward is itself a Recompute, of fn's
    vector-Jacobian product, so that a double backward keeps only xs and the output gradients too.
    Like autograd, it differentiates only towards the inputs the running backward needs: dE/dp
    needs no gradient at the observed keys and values.
    """

    @staticmethod
    def forward(ctx, fn, *xs):
        device = xs[0].device.type
        ctx.fn = partial(autocast_like_now, device, torch.is_autocast_enabled(device),
                         torch.get_autocast_dtype(device), fn)
        ctx.save_for_backward(*xs)
        return fn(*xs)

    @staticmethod
    def backward(ctx, *dys):
        xs = ctx.saved_tensors
        wrt = [i for i, x in enumerate(xs) if needed(x)]
        grads = [None] * len(xs)
        for i, g in zip(wrt, Recompute.apply(partial(vjp, ctx.fn, len(xs), wrt), *xs, *dys)):
            grads[i] = g
        return None, *grads


def needed(x):
    """Whether the running backward needs the gradient at x: x leads to what it differentiates (the
    engine's own pruning, which torch.autograd.graph.register_multi_grad_hook asks too; of a leaf,
    a weight, the engine cannot tell under autograd.grad: needed)."""
    if not x.requires_grad or x.grad_fn is None:
        return x.requires_grad
    return torch._C._will_engine_execute_node(x.grad_fn)


def autocast_like_now(device, enabled, dtype, fn, *xs):
    """fn(*xs) under the autocast state (device, enabled, dtype) of a Recompute's forward."""
    with torch.autocast(device, dtype=dtype, enabled=enabled):
        return fn(*xs)


def vjp(fn, n, wrt, *args):
    """
    The gradients at xs[i], i in wrt, of fn(*xs) weighted by dys, where xs = args[:n] and dys =
    args[n:] (its vector-Jacobian product): differentiable in args while grad mode is on, as in a
    Recompute's backward of it.
    """
    xs, dys = args[:n], args[n:]
    differentiable = torch.is_grad_enabled()
    with torch.enable_grad():
        if not differentiable:
            xs = [x.detach().requires_grad_() for x in xs]
        return torch.autograd.grad(fn(*xs), [xs[i] for i in wrt], dys,
                                   create_graph=differentiable, materialize_grads=True)
