"""Scaling up within one process: gradient accumulation, mixed precision (train.dtype), torch.compile."""

import math
import warnings

import pytest
import torch

import ebm
import engine
import train as train_mod
from conftest import make_model
from data import Dataset
from helpers import TINY, TINY_MODEL, compose_cfg, load_ckpt, read_metrics, run_train, write_corpus
from util import UserError

ENERGIES = ["linear", "mixture", "transformer"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text file (20k characters, 22 symbols) for quick runs."""
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", n_chars=20_000)


def step_config(model, **train):
    """The run config of a training step on this model, with train.* overrides."""
    cfg = compose_cfg("train", [f"train.{k}={v}" for k, v in train.items()])
    cfg.model = model.config
    return cfg


# ---------------------------------------------------------------------------------------------------
# gradient accumulation


def test_accumulation_equals_one_big_batch(one_thread):
    """Two optimizer steps on 16 windows in 2 or 4 micro-batches give the parameters of 1 micro-batch (float64)."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(11, (16, 16), generator=g), torch.randint(11, (16, 16), generator=g)) for _ in range(2)]
    results = {}
    for accum in (1, 2, 4):
        model = make_model(seed=0, energy="mixture", mixture_hidden=16).train()  # float64
        cfg = step_config(model, grad_accum_steps=accum)
        opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.99), "cpu")
        ces = [train_mod.train_step(train_mod.Objective(model), opt, x, y, cfg)["train_loss"] for x, y in batches]
        results[accum] = (torch.stack(ces), {n: p.detach().clone() for n, p in model.named_parameters()})
    start = make_model(seed=0, energy="mixture", mixture_hidden=16).state_dict()
    ce1, p1 = results[1]
    assert all(not torch.equal(p1[n], start[n]) for n in ("energy_head.weight", "mix_fc.weight"))  # it trained
    for accum in (2, 4):
        ce, p = results[accum]
        assert torch.allclose(ce, ce1, rtol=0, atol=1e-12)  # the reported CE is the mean over micro-batches
        for n in p1:
            assert torch.allclose(p[n], p1[n], rtol=0, atol=1e-10), (accum, n)


def test_accumulation_run_equals_bigger_batch_run(corpus, tmp_path, capsys):
    """A run with batch 8 x accum 2 draws the windows of batch 16 x accum 1 and ends with its weights and losses."""
    common = TINY_MODEL + ["data.block_size=16", f"data.data_path={corpus}", "train.max_steps=4",
                           "train.eval_interval=2", "train.eval_iters=1", "train.learning_rate=1e-2"]
    capsys.readouterr()
    run_train(common + ["data.batch_size=8", "train.grad_accum_steps=2", f"out_dir={tmp_path / 'accum'}"])
    assert "16 windows per step" in capsys.readouterr().out  # tokens/s counts every micro-batch
    run_train(common + ["data.batch_size=16", f"out_dir={tmp_path / 'big'}"])
    a, b = (load_ckpt(tmp_path / d / "final.pt")["model"] for d in ("accum", "big"))
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k
    for ra, rb in zip(read_metrics(tmp_path / "accum"), read_metrics(tmp_path / "big")):  # (val batches: batch_size)
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-5)


def test_batch_shares_split_the_batch():
    """Each of `world` processes gets its own rows of the same draw; together they are the one-process batch."""
    data = Dataset("abcdefghij klmnopqrst\n" * 50, block_size=8)
    x, y = data.batch("train", 6, torch.Generator().manual_seed(3))
    for world in (2, 3):
        shares = [data.batch("train", 6, torch.Generator().manual_seed(3), rank=r, world=world) for r in range(world)]
        assert all(s[0].shape == (6 // world, 8) for s in shares)
        assert torch.equal(torch.cat([s[0] for s in shares]), x) and torch.equal(torch.cat([s[1] for s in shares]), y)


# ---------------------------------------------------------------------------------------------------
# mixed precision


def test_grad_scaler_only_for_float16_on_cuda():
    """A GradScaler is chosen for float16 on CUDA, and for nothing else (bfloat16 and float32 need none)."""
    with warnings.catch_warnings():  # no CUDA here: torch warns that the scaler is disabled
        warnings.simplefilter("ignore")
        assert isinstance(engine.grad_scaler("float16", "cuda"), torch.amp.GradScaler)
    for dtype, device_type in [("bfloat16", "cuda"), ("float32", "cuda"), ("float16", "cpu"), ("bfloat16", "cpu"),
                               ("float32", "cpu"), ("bfloat16", "mps"), ("float16", "mps")]:
        assert engine.grad_scaler(dtype, device_type) is None, (dtype, device_type)


def test_float16_off_cuda_is_refused():
    """float16 on CPU or MPS (no loss scaling there) is one line that names bfloat16 as the remedy."""
    for device_type in ("cpu", "mps"):
        with pytest.raises(UserError, match="train.dtype=bfloat16") as err:
            engine.check_dtype("float16", device_type)
        assert "\n" not in str(err.value)
    engine.check_dtype("bfloat16", "cpu")
    engine.check_dtype("float32", "mps")


@pytest.mark.parametrize("energy", ENERGIES)
def test_think_runs_in_float32_under_autocast(energy, one_thread, monkeypatch):
    """Under bfloat16 autocast every think step's logits and energy vector are float32; the loss backpropagates."""
    model = make_model(seed=0, dtype=torch.float32, energy=energy, mixture_hidden=16).train()
    seen = []
    real_grad = ebm.free_energy_grad

    def spy(z, e, tau):
        seen.append((z.dtype, e.dtype))
        return real_grad(z, e, tau)

    monkeypatch.setattr(ebm, "free_energy_grad", spy)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(11, (2, 16), generator=g), torch.randint(11, (2, 16), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.energy_head(torch.randn(2, 32)).dtype == torch.bfloat16  # autocast is on
        terms = ebm.losses(model, x, y)
        loss = ebm.total_loss(model.config, terms)
    loss.backward()
    assert len(seen) == model.config.think_steps
    assert all(dz == de == torch.float32 for dz, de in seen), seen
    assert terms["ce"].dtype == torch.float32 and math.isfinite(loss.item())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_bfloat16_trains_on_cpu(corpus, tmp_path):
    """train.dtype=bfloat16 trains on CPU with finite losses near float32's; checkpoints hold float32 weights."""
    common = TINY_MODEL + ["data.block_size=16", "data.batch_size=8", f"data.data_path={corpus}", "train.max_steps=6",
                           "train.eval_interval=3", "train.eval_iters=2", "train.learning_rate=1e-2",
                           "model.use_contrastive=true"]
    run_train(common + ["train.dtype=bfloat16", f"out_dir={tmp_path / 'bf16'}"])
    run_train(common + [f"out_dir={tmp_path / 'fp32'}"])
    bf16, fp32 = read_metrics(tmp_path / "bf16"), read_metrics(tmp_path / "fp32")
    assert [r["step"] for r in bf16] == [3, 6]
    for rb, rf in zip(bf16, fp32):
        assert all(math.isfinite(rb[k]) for k in ("train_loss", "val_loss", "val_loss_s1"))
        assert rb["val_loss"] == pytest.approx(rf["val_loss"], abs=0.01)
    for name in ("final.pt", "ckpt.pt"):
        ckpt = load_ckpt(tmp_path / "bf16" / name)
        assert all(t.dtype == torch.float32 for t in ckpt["model"].values()), name


# ---------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.slow
@pytest.mark.parametrize("energy", ENERGIES)
def test_compile_trains_every_energy(energy, corpus, tmp_path):
    """train.compile=true trains each energy on CPU to the eager run's weights (float tolerance); clean keys."""
    common = TINY + ["data.batch_size=8", f"data.data_path={corpus}", f"model.energy={energy}",
                     "train.learning_rate=1e-2"] + (["model.mixture_hidden=16"] if energy == "mixture" else [])
    run_train(common + ["train.compile=true", f"out_dir={tmp_path / 'compiled'}"])
    run_train(common + [f"out_dir={tmp_path / 'eager'}"])
    compiled, eager = (load_ckpt(tmp_path / d / "ckpt.pt") for d in ("compiled", "eager"))
    assert compiled["model"].keys() == eager["model"].keys()  # no `_orig_mod.` prefixes
    for k in eager["model"]:
        assert torch.allclose(compiled["model"][k], eager["model"][k], rtol=1e-4, atol=1e-5), k
    rows = read_metrics(tmp_path / "compiled")
    assert rows[-1]["val_loss"] == pytest.approx(read_metrics(tmp_path / "eager")[-1]["val_loss"], abs=1e-4)


def test_compile_without_a_cpp_compiler_trains_eager(monkeypatch, capsys):
    """train.compile=true on CPU with no C++ compiler on PATH: the model uncompiled (the transformer energy's
    dE/dp too) and one line naming the remedy, before any compile; with one, dE/dp is compiled too."""
    monkeypatch.setattr(engine.shutil, "which", lambda name: None)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled without a compiler"))
    model = make_model(seed=0, dtype=torch.float32, energy="transformer")
    assert engine.compiled(model, step_config(model, compile="true")) is model
    assert model.compiled_dE_dp is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "C++ compiler" in out[0] and "training eager" in out[0] and "install g++" in out[0]
    assert engine.compiled(model, step_config(model)) is model  # compile off: the model itself
    monkeypatch.setattr(engine.shutil, "which", lambda name: f"/usr/bin/{name}")
    options = []
    monkeypatch.setattr(torch, "compile", lambda f, **kw: options.append(kw) or f)
    engine.compiled(model, step_config(model, compile="true"))
    assert model.compiled_dE_dp is not None  # with a compiler: the candidate pass and its dE/dp compiled too
    # dE/dp without persistent reductions: torch 2.11's Triton failed to build one in bfloat16 (docs/gpu.md)
    assert {"options": {"triton.persistent_reductions": False}} in options
