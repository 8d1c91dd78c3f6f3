"""Devices and the things around them: wandb without a login, a GPU torch cannot use, CUDA and MPS
paths (tested on CPU where their logic allows: device types passed by name, torch's device queries
monkeypatched), float32 energies under autocast, deterministic PCD chains, the KV cache's dtype,
bench.py's peak."""

import io
import os
import subprocess
import sys
import types
import warnings
from functools import partial

import pytest
import torch

import bench
import checkpoints
import contrastive
import ebm
import energies
import engine
import model as model_mod
import train as train_mod
import util
from conftest import make_model
from helpers import REPO, TINY, compose_cfg, error_lines, write_corpus
from util import UserError

ENERGIES = ["linear", "mixture", "transformer"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text file (20k characters, 22 symbols) for quick runs."""
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", n_chars=20_000)


# --------------------------------------------------------------------------------------------------
# A. wandb without a login


def no_wandb_env(home):
    """The environment of a machine with no wandb login: an empty HOME, no WANDB_* variables, no
    NETRC."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    return {**env, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}


def test_wandb_without_login_fails_fast_in_one_line(corpus, tmp_path):
    """wandb_project with no key and no terminal: one line naming the remedies, exit != 0, before
    any training."""
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    args = [str(REPO / "train.py"), "wandb_project=x", f"out_dir={out}", f"data.data_path={corpus}",
            *TINY]
    r = subprocess.run([sys.executable, *args], cwd=tmp_path, env=no_wandb_env(home),
                       stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=300)
    lines = error_lines(r.stderr)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1, r.stderr
    assert all(s in lines[0] for s in ("wandb login", "WANDB_API_KEY",
                                       "WANDB_MODE=offline")), lines[0]
    # nothing trained
    assert not (out / "ckpt.pt").exists() and not (out / "metrics.jsonl").exists()


@pytest.fixture
def no_login(tmp_path, monkeypatch):
    """This process as on a machine without a wandb login and without a terminal; wandb's session is
    reset."""
    import wandb

    # end wandb's session first: its service's address lives in WANDB_SERVICE, which must not come
    # back once the service is gone (a later wandb.init in this process would try to reach it)
    wandb.teardown()
    os.environ.pop("WANDB_SERVICE", None)
    home = tmp_path / "home"
    home.mkdir()
    for k in list(os.environ):
        if k.startswith("WANDB_") or k == "NETRC":
            monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setattr(sys, "stdin", io.StringIO())  # not a terminal
    yield
    wandb.teardown()
    os.environ.pop("WANDB_SERVICE", None)


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_wandb_offline_and_disabled_need_no_login(mode, no_login, monkeypatch):
    """WANDB_MODE=offline or disabled passes the login check without a key."""
    monkeypatch.setenv("WANDB_MODE", mode)
    train_mod.check_wandb(compose_cfg("train", ["wandb_project=x"]))


def test_wandb_check_in_process(no_login, monkeypatch):
    """No key: the check refuses in one line; a key (WANDB_API_KEY) passes; an unknown WANDB_MODE is
    one line."""
    import wandb

    cfg = compose_cfg("train", ["wandb_project=x"])
    train_mod.check_wandb(compose_cfg("train", []))  # no wandb_project: nothing to check
    with pytest.raises(UserError, match="wandb login.*WANDB_API_KEY.*WANDB_MODE=offline") as err:
        train_mod.check_wandb(cfg)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("WANDB_MODE", "bogus")
    wandb.teardown()
    with pytest.raises(UserError, match="WANDB_MODE='bogus' is not a wandb mode"):
        train_mod.check_wandb(cfg)


# --------------------------------------------------------------------------------------------------
# B1. a GPU torch cannot use


@pytest.fixture
def unusable_gpu(monkeypatch):
    """An NVIDIA driver on this machine (nvidia-smi on PATH) that torch cannot use, as with a
    too-old driver."""
    real_which = util.shutil.which

    def cuda_unavailable():
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found "
                      "version 11040). "
                      "Please update your GPU driver by downloading and installing a new version")
        return False

    monkeypatch.setattr(util.shutil, "which",
                        lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi"
                        else real_which(name))
    monkeypatch.setattr(torch.cuda, "is_available", cuda_unavailable)
    monkeypatch.setattr(torch.version, "cuda", "13.2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_auto_with_an_unusable_gpu_is_one_line(unusable_gpu):
    """device auto with an NVIDIA GPU that torch cannot use: one line with torch's CUDA, its reason
    and remedies."""
    with pytest.raises(UserError) as err:
        util.pick_device("auto")
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("NVIDIA GPU", "CUDA 13.2",
                 "driver on your system is too old (found version 11040)",
                 "update the NVIDIA driver", "install a torch build", "train.device=cpu"):
        assert part in msg, (part, msg)
    with pytest.raises(UserError, match="pass device=cpu"):  # sample.py's key
        util.pick_device("auto", key="device")
    # cuda named: the same reason
    with pytest.raises(UserError, match="CUDA 13.2.*train.device=cpu"):
        util.pick_device("cuda")
    assert util.pick_device("cpu") == "cpu"  # the CPU, chosen knowingly


def test_unusable_gpu_with_a_cpu_only_torch(unusable_gpu, monkeypatch):
    """A CPU-only torch on a GPU machine is named as such, with the remedy of a CUDA build."""
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(UserError,
                       match="CPU-only build.*install a CUDA build of torch.*train.device=cpu"):
        util.pick_device("auto")


def test_hidden_gpus_and_no_gpu_mean_cpu(unusable_gpu, monkeypatch):
    """CUDA_VISIBLE_DEVICES='' hides the GPU on purpose: auto is the CPU; without a GPU, cuda stays
    one line."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert util.pick_device("auto") == "cpu"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(util.shutil, "which", lambda name: None)
    assert util.pick_device("auto") == "cpu"  # (no /proc/driver/nvidia here)
    with pytest.raises(UserError, match="device 'cuda' is not available on this machine: "
                                        "use train.device=auto"):
        util.pick_device("cuda")


# --------------------------------------------------------------------------------------------------
# B2, B3. compile and float16 on CUDA and MPS


def on_device(device_type):
    """A stand-in model whose parameters report device_type (torch.device needs no such device to
    exist)."""
    param = types.SimpleNamespace(device=torch.device(device_type))
    return types.SimpleNamespace(parameters=lambda: iter([param]))


def test_compile_on_cuda_without_a_c_compiler_trains_eager(monkeypatch, capsys):
    """train.compile=true on CUDA with no C compiler (CC unset, no gcc or clang): the model
    uncompiled and one line naming the remedy; with one (CC, or gcc on PATH) it compiles."""
    cfg = compose_cfg("train", ["train.compile=true"])
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or "compiled")
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(engine.shutil, "which", lambda name: None)
    model = on_device("cuda")
    assert engine.compiled(model, cfg) is model and not compiled
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "needs a C compiler" in out[0] and "training eager" in out[0]
    assert "install gcc or clang" in out[0]
    monkeypatch.setenv("CC", "/opt/bin/mycc")  # Triton takes $CC first
    assert engine.compiled(model, cfg) == "compiled"
    monkeypatch.delenv("CC")
    monkeypatch.setattr(engine.shutil, "which",
                        lambda name: "/usr/bin/gcc" if name == "gcc" else None)
    assert engine.compiled(model, cfg) == "compiled"


def test_compile_on_mps_trains_eager_with_a_note(monkeypatch, capsys):
    """train.compile=true on MPS returns the model uncompiled and says so in one line."""
    monkeypatch.setattr(torch, "compile", lambda m: pytest.fail("compiled on MPS"))
    model = on_device("mps")
    assert engine.compiled(model, compose_cfg("train", ["train.compile=true"])) is model
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "not used on MPS" in out[0] and "eager" in out[0]


def test_float16_with_the_transformer_energy_is_refused_on_cuda():
    """float16 + transformer energy on CUDA (dE/dp unscaled) is one line pointing to bfloat16; other
    energies pass."""
    with pytest.raises(UserError, match="model.energy=transformer.*train.dtype=bfloat16") as err:
        engine.check_dtype("float16", "cuda", "transformer")
    assert "\n" not in str(err.value)
    for energy in ("linear", "mixture"):
        engine.check_dtype("float16", "cuda", energy)
    # off CUDA float16 is refused whatever the energy
    with pytest.raises(UserError, match="CUDA only"):
        engine.check_dtype("float16", "cpu", "transformer")


# --------------------------------------------------------------------------------------------------
# B4. energies and energy vectors in float32 under autocast


def observe_and_think(model, x, p, steps=3):
    """The energies e, E(p) and dE/dp of the model's energy at candidates p, and the think-loop
    logits."""
    h, e, caches = ebm.observe(model, x)
    energy = ebm.make_energy(model, h, e, caches)
    E, dE_dp = energy(p)
    return e, E, dE_dp, ebm.system2_logits(model, e, energy, steps), (h, caches)


@pytest.mark.parametrize("energy", ENERGIES)
def test_energies_are_float32_under_bfloat16_autocast(energy, one_thread):
    """Under bfloat16 autocast e, E(p), dE/dp and the think logits are float32 and near their
    float32 values."""
    model = make_model(seed=0, dtype=torch.float32, energy=energy, mixture_hidden=16).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(11, (2, 16), generator=g)
    p = torch.softmax(torch.randn(2, 16, 11, generator=g), -1)
    with torch.no_grad():
        ref = observe_and_think(model, x, p)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = observe_and_think(model, x, p)
    names = ("e", "E", "dE/dp")
    for name, a, b in zip(names, got[:3], ref[:3]):
        assert a.dtype == torch.float32, (name, a.dtype)
        # bfloat16 matmuls upstream of the head: ~0.3% relative error measured; 2% allowed
        assert (a - b).abs().max() <= 0.02 * b.abs().max(), name
    assert all(z.dtype == torch.float32 for z in got[3])
    assert (got[3][-1] - ref[3][-1]).abs().max() <= 0.02 * ref[3][-1].abs().max()


def test_mixture_energy_ignores_autocast(one_thread):
    """The mixture's E and dE/dp from the same h under bfloat16 autocast equal their float32 values
    (no bf16 math)."""
    model = make_model(seed=0, dtype=torch.float32, energy="mixture", mixture_hidden=16).eval()
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 16, 32, generator=g)
    p = torch.softmax(torch.randn(2, 16, 11, generator=g), -1)
    with torch.no_grad():
        e = model.energies(h)
        E, dE_dp = energies.mixture_energy(model, h, e)(p)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            E_ac, dE_dp_ac = energies.mixture_energy(model, h, e)(p)
    assert torch.allclose(E_ac, E, rtol=1e-5, atol=1e-6) and torch.allclose(dE_dp_ac, dE_dp,
                                                                            rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# B5. PCD write-back


@pytest.mark.parametrize("kind", ["pcd", "fast_pcd"])
def test_pcd_step_under_deterministic_algorithms(kind, one_thread):
    """A PCD / fast PCD training step runs with torch.use_deterministic_algorithms(True), twice
    alike."""
    results = []
    for _ in range(2):
        model = make_model(seed=0, dtype=torch.float32, use_contrastive=True, contrastive_type=kind,
                           n_persistent=8, contrastive_k=2).train()
        state = contrastive.ReplayState(model.config)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randint(11, (4, 16), generator=g), torch.randint(11, (4, 16), generator=g)
        torch.manual_seed(0)
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            terms = contrastive.losses(model, x, y, state)
            ebm.total_loss(model.config, terms).backward()
        finally:
            torch.use_deterministic_algorithms(previous)
        results.append((state.replay_chain.clone(), state.fast_weight.clone(),
                        model.energy_head.weight.grad.clone()))
    for a, b in zip(*results):  # the same computation, same shapes: the same bits
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# B6. the KV cache under autocast


@pytest.mark.parametrize("energy", ["linear", "transformer"])
def test_generate_under_autocast_caches_in_bfloat16(energy, one_thread, monkeypatch):
    """Generating under bfloat16 autocast works and allocates the KV cache in bfloat16."""
    model = make_model(seed=0, dtype=torch.float32, energy=energy).eval()
    made = []
    real_new_caches = model.new_caches
    monkeypatch.setattr(model, "new_caches", lambda *a,
                        **k: made.append(real_new_caches(*a, **k)) or made[-1])
    idx = torch.randint(11, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # 19 tokens > block 16: the cache is rebuilt once
        out = ebm.generate(model, idx, 14, partial(ebm.system2_logits, steps=2))
    assert out.shape == (2, 19) and int(out.max()) < 11
    assert len(made) == 2 and all(c.k.dtype == c.v.dtype == torch.bfloat16 for caches in made
                                  for c in caches)
    assert model.new_caches(1)[0].k.dtype == torch.float32  # outside autocast: the weights' dtype


# --------------------------------------------------------------------------------------------------
# B7, B8. fused AdamW and TF32


def test_fused_adamw_by_device():
    """AdamW is fused on CUDA and on MPS (torch >= 2.4), not on CPU; the CPU optimizer is the
    default one."""
    assert model_mod.fused_adamw("cuda") is True
    assert model_mod.fused_adamw("mps") is (torch.__version__ >= "2.4")
    assert model_mod.fused_adamw("cpu") is False
    opt = make_model(dtype=torch.float32).configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    assert not opt.defaults["fused"]


def test_tf32_through_the_current_api():
    """allow_tf32 sets TF32 for CUDA float32 matmuls through fp32_precision (torch >= 2.9), with no
    warning."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch < 2.9: allow_tf32 is the only API")
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            engine.allow_tf32()
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


# --------------------------------------------------------------------------------------------------
# B9. the MPS RNG state in ckpt.pt


def test_mps_rng_state_round_trips_through_ckpt(corpus, tmp_path, monkeypatch):
    """Checkpoints saves the device RNG of an MPS run in ckpt.pt and puts it back on resume (a CPU
    generator stands in for MPS's, through torch.mps.get_rng_state / set_rng_state)."""
    fake = torch.Generator().manual_seed(5)
    monkeypatch.setattr(torch.mps, "get_rng_state", fake.get_state)
    monkeypatch.setattr(torch.mps, "set_rng_state", fake.set_state)
    cfg = compose_cfg("train", TINY + [f"data.data_path={corpus}", f"out_dir={tmp_path}"])
    run = engine.setup(cfg, "cpu")
    procs = util.Processes("cpu")
    ckpts = checkpoints.Checkpoints(cfg, procs, run)
    ckpts.device_rng = "mps"  # as __init__ sets it for a model on MPS
    ckpts.save("ckpt.pt", 1, 9.0, 0.5)
    after_save = torch.rand(4, generator=fake)
    torch.rand(100, generator=fake)  # the stream moves on
    assert ckpts.resume() == (1, 9.0, 0.5)
    assert torch.equal(torch.rand(4, generator=fake), after_save)
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)["rng"]
    assert len(saved["mps"]) == 1 and "cuda" not in saved


# --------------------------------------------------------------------------------------------------
# B10. bench.py


def test_matmul_peak_in_the_training_dtype(one_thread):
    """bench.matmul_peak measures a positive FLOP/s in float32 and in bfloat16 on CPU."""
    for dtype in ("float32", "bfloat16"):
        assert bench.matmul_peak("cpu", dtype, repeats=1) > 0


def test_flop_count_of_a_matmul_and_its_gradients(one_thread):
    """bench.counted_flops: 2mnk for an (m, k) @ (k, n) matmul; its backward adds twice that (both
    inputs)."""
    a, b = torch.randn(3, 5, requires_grad=True), torch.randn(5, 7, requires_grad=True)
    assert bench.counted_flops(lambda: a @ b) == 2 * 3 * 5 * 7
    assert bench.counted_flops(lambda: (a @ b).sum().backward()) == 3 * 2 * 3 * 5 * 7


def test_flop_count_counts_every_dispatched_op(one_thread):
    """bench.FlopCount.ops: one per aten op dispatched, elementwise ones included (which add no
    FLOPs); an in-place op counts too."""
    a, b = torch.randn(3, 5), torch.randn(5, 7)
    with bench.FlopCount() as count:
        c = (a @ b).relu()
        c.add_(1.0)
    assert (count.ops, count.flops) == (3, 2 * 3 * 5 * 7)


def test_flop_count_sees_the_double_backward(one_thread, tmp_path):
    """An EBT step is counted with its dE/dp (autograd.grad with create_graph) and the backward
    through it: with 2 think steps through every block, over 3 times the FLOPs of the same model's
    step without them."""
    from helpers import TINY_MODEL, compose_cfg, write_corpus
    from engine import Objective, setup, train_step

    corpus = write_corpus(tmp_path / "corpus.txt", n_chars=2000)
    cfg = compose_cfg("train", TINY_MODEL + ["preset=ebt", "data.block_size=8", "data.batch_size=2",
                                             f"data.data_path={corpus}"])
    run = setup(cfg)
    x, y = run.data.batch("train", 2, torch.Generator().manual_seed(0), "cpu")
    objective = Objective(run.model, run.state)

    def step_with(k):
        cfg.model.think_steps = k  # the model's config
        return train_step(objective, run.optimizer, x, y, cfg)

    flops = {k: bench.counted_flops(lambda: step_with(k)) for k in (0, 2)}
    assert flops[2] > 3 * flops[0] > 0


def test_memory_count_of_a_tensor_allocated_and_freed(one_thread):
    """bench.MemoryCount: a (1000, 1000) float32 tensor allocated, viewed, changed in place and freed
    gives a peak of 4,000,000 bytes and leaves 0; tensors made and dropped in turn never pile up."""
    with bench.MemoryCount() as count:
        a = torch.ones(1000, 1000)
        b = a.view(-1)[10:]  # a view: the same storage
        a.add_(1.0)  # in place: the same storage
        del a, b
    assert (count.peak, count.now) == (4_000_000, 0)
    assert count.at_peak == {"ones (1000, 1000) float32": [1, 4_000_000]}
    with bench.MemoryCount() as count:
        for _ in range(10):
            t = torch.ones(1000)  # the next is made while the last is alive
    assert (count.peak, count.now) == (2 * 4000, 4000)
    del t


def test_memory_count_of_a_matmul_chain(one_thread):
    """bench.MemoryCount of x @ w1 @ w2 with the intermediate dropped: the inputs (alive before,
    counted once though read twice), the intermediate and the result at the peak; without the
    intermediate after. With autograd the saved tensors count until the backward frees them, and
    what a backward makes is named by its node."""
    x, w1, w2 = torch.randn(100, 200), torch.randn(200, 300), torch.randn(300, 50)
    inputs = (100 * 200 + 200 * 300 + 300 * 50) * 4
    with bench.MemoryCount() as count:
        y = x @ w1
        z = y @ w2 + x[:, :50]
        del y
    # y (100 x 300), y @ w2 and z (100 x 50 each) alive at once
    assert count.peak == inputs + (100 * 300 + 2 * 100 * 50) * 4
    assert count.now == inputs + 100 * 50 * 4 and count.at_peak["alive before"] == [3, inputs]
    w1.requires_grad_()
    with bench.MemoryCount() as count:
        loss = (x @ w1).exp().sum()  # exp keeps its (100 x 300) result for the backward
        saved = count.now
        loss.backward()
        del loss
    read = (100 * 200 + 200 * 300) * 4  # x and w1: the window does not read w2
    assert saved == read + (100 * 300 + 1) * 4
    assert count.now == read + 200 * 300 * 4  # w1.grad is what stays
    assert "ExpBackward0: mul (100, 300) float32" in count.by_what  # a backward's, by its node


def test_bench_counts_each_modes_peak_memory(one_thread, tmp_path):
    """bench.py's training table counts each mode's peak tensor memory on CPU: at least the
    parameters, their gradients and AdamW's two moments (4x the parameters' bytes), and EBT's step
    (its think steps differentiated twice) above plain's; and its FLOPs as the math's, with what
    EBT's recomputation adds beside."""
    corpus = write_corpus(tmp_path / "corpus.txt", n_chars=5000)
    cfg = compose_cfg("bench", TINY + [f"data.data_path={corpus}", "bench.modes=[plain,ebt]",
                                       "bench.steps=1", "bench.repeats=1", "bench.warmup=0",
                                       "bench.compile=false", "bench.dtypes=[]"])
    train, *_ = bench.bench_training(cfg, cfg.bench)
    for mode, t in train.items():
        assert t["memory_bytes"] >= 4 * 4 * t["params"], mode
    assert train["plain"]["memory_ratio"] == 1 and train["ebt"]["memory_ratio"] > 1.5
    assert "alive before" in train["ebt"]["memory_at_peak"]
    # the FLOPs counted are the math's; EBT's recomputation runs more
    assert train["plain"]["flops_run_per_step"] == train["plain"]["flops_per_step"]
    assert train["ebt"]["flops_run_per_step"] > 1.05 * train["ebt"]["flops_per_step"]


@pytest.mark.slow
def test_bench_times_compiled_and_eager_side_by_side(one_thread, tmp_path):
    """With train.compile=true bench.py times every mode compiled and eager in one interleaving: the
    eager rows run a model with no compiled parts, and each row's time ratio is against the plain
    step of its own kind."""
    corpus = write_corpus(tmp_path / "corpus.txt", n_chars=5000)
    cfg = compose_cfg("bench", TINY + [f"data.data_path={corpus}", "bench.modes=[plain,ebt]",
                                       "bench.steps=1", "bench.repeats=1", "bench.warmup=1",
                                       "bench.compile=false", "bench.dtypes=[]",
                                       "train.compile=true"])
    train, settings, *_ = bench.bench_training(cfg, cfg.bench)
    assert list(train) == ["plain", "plain eager", "ebt", "ebt eager"]
    compiled_model = settings["ebt"][0].model
    assert compiled_model._orig_mod.compiled_dE_dp is not None  # torch.compile's wrapper
    eager_model = settings["ebt eager"][0].model
    assert not hasattr(eager_model, "_orig_mod") and eager_model.compiled_dE_dp is None
    for row, base in (("ebt", "plain"), ("ebt eager", "plain eager")):
        assert train[row]["time_ratio"] == pytest.approx(train[row]["ms_per_step"]
                                                         / train[base]["ms_per_step"])
