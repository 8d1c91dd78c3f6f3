"""The command-line interface: every command line of the predecessor's README (seeds/001) works, every
documented key lands where it should, and bad input gets one clear line and a non-zero exit."""

import os
import pickle
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import engine
import helpers
from helpers import (REPO, TINY, TINY_DATA, TINY_MODEL, cli, error_lines, load_ckpt, run_sample, run_train,
                     seed_argv)

import train as train_mod

SEED_FILE = REPO.parent / "shared" / "seeds" / "001_560f304c787799ef.txt"

# Every command line of seeds/001, copied verbatim (the `uv sync` line is run by .ci/run). The README's
# first command, `uv run python train.py model.use_contrastive=true`, appears twice; it is listed once.
SEED_TRAIN = [
    "uv run python train.py model.use_contrastive=true",
    "uv run python train.py wandb_project=nanoebm",
    "uv run python train.py model.use_contrastive=true model.contrastive_type=pcd",
    "uv run python train.py model.use_contrastive=true model.contrastive_type=fast_pcd",
    """uv run python train.py \\
model.use_contrastive=true \\
model.contrastive_type=cd \\
model.contrastive_k=5 \\
model.contrastive_weight=0.2 \\
model.langevin_step_size=0.01 \\
model.langevin_noise_scale=0.005""",
    """uv run python train.py \\
model.use_contrastive=true \\
model.contrastive_weight=0.1 \\
train.max_steps=100""",
    """uv run python train.py \\
model.use_contrastive=true \\
model.contrastive_type=pcd \\
model.contrastive_weight=0.2 \\
train.max_steps=100""",
    """uv run python train.py \\
model.use_contrastive=true \\
model.contrastive_weight=0.01 \\
model.contrastive_k=1 \\
train.max_steps=100""",
]
SEED_TRAIN_COMPILE = """!uv run python train.py \\
model.n_layer=8 \\
model.n_head=8 \\
model.n_embd=512 \\
model.refine_steps=6 \\
model.dropout=0.2 \\
model.use_contrastive=true \\
model.contrastive_type=pcd \\
model.contrastive_k=10 \\
model.contrastive_weight=0.15 \\
model.n_persistent=500 \\
data.batch_size=128 \\
data.block_size=256 \\
train.max_steps=10000 \\
train.learning_rate=6e-4 \\
train.compile=true \\
wandb_project=nanoebm \\
wandb_name=h100_8L_512d_pcd10_shakespeare"""
SEED_SAMPLE = [
    'uv run python sample.py checkpoint=out_ebt/final.pt max_new_tokens=500 prompt="HAMLET:"',
    "uv run python sample.py checkpoint=out_ebt/final.pt use_thinking=true think_steps=4 topk=64",
    """uv run python sample.py \\
checkpoint=out_ebt/final.pt \\
use_thinking=true think_steps=4 topk=64 \\
sample=true sample_temp=1.2 sample_top_p=0.9""",
    "uv run python sample.py checkpoint=out_ebt/final.pt use_thinking=false",
]
SEED_ALL = SEED_TRAIN + [SEED_TRAIN_COMPILE] + SEED_SAMPLE

# appended to every seed training command: two steps, and a small batch so big shapes run fast on CPU
FAST = ["train.max_steps=2", "train.eval_interval=1", "train.eval_iters=1", "data.batch_size=2",
        "data.block_size=32"]


def seed_commands_in_file(text):
    """The command lines of the seed file, as the README shows them (continuations joined)."""
    # the scraped README glued the next heading onto the last sampling command
    text = text.replace("use_thinking=falseAcknowledgements to minGPT", "use_thinking=false\n")
    commands, current = [], None
    for line in text.splitlines():
        line = line.strip()
        if current is not None:
            current += "\n" + line
        elif line.lstrip("!").startswith("uv run"):
            current = line
        else:
            continue
        if not current.endswith("\\"):
            commands.append(current)
            current = None
    return commands


def test_seed_list_matches_the_readme():
    """The commands this file runs are exactly the command lines of seeds/001."""
    if not SEED_FILE.exists():
        pytest.skip(f"{SEED_FILE} is not beside the repo")
    def key(command):
        script, overrides = seed_argv(command)
        return script, tuple(overrides)

    in_file = {key(c) for c in seed_commands_in_file(SEED_FILE.read_text())}
    assert in_file == {key(c) for c in SEED_ALL}


# ---------------------------------------------------------------------------------------------------
# seed training commands


@pytest.mark.parametrize("command", SEED_TRAIN[2:], ids=lambda c: " ".join(seed_argv(c)[1])[:60])
def test_seed_train_command_runs(command, tmp_path, capsys):
    """Each README training command trains (shortened) and writes its checkpoints into out_dir."""
    script, overrides = seed_argv(command)
    assert script == "train.py"
    cfg = run_train(overrides + FAST + [f"out_dir={tmp_path}"])
    for key in overrides:  # the README's own settings are the ones that ran (except the shortened ones)
        name, value = key.split("=", 1)
        if name not in {"train.max_steps", "data.batch_size", "data.block_size"}:
            assert _same(_get(cfg, name), value), key
    assert {"final.pt", "best.pt", "ckpt.pt", "metrics.jsonl"} <= {p.name for p in tmp_path.iterdir()}
    assert helpers.read_metrics(tmp_path)[-1]["step"] == 2


def _same(actual, text):
    """Does the config value equal the command-line text (as Hydra would read it)?"""
    if isinstance(actual, bool):
        return str(actual).lower() == text.lower()
    if isinstance(actual, (int, float)):
        return actual == float(text)
    return actual == text


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_seed_default_training_command_as_subprocess(tmp_path):
    """`uv run python train.py model.use_contrastive=true` (the README's first command) runs as a program."""
    script, overrides = seed_argv(SEED_TRAIN[0])
    r = cli(["python", script, *overrides, *FAST, f"out_dir={tmp_path / 'out'}"], uv=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "done: 2 steps" in r.stdout and "ms a training step" in r.stdout
    assert (tmp_path / "out" / "final.pt").is_file()


def test_seed_wandb_command_writes_only_into_out_dir(tmp_path, monkeypatch, capsys):
    """`wandb_project=nanoebm` logs offline (WANDB_MODE=offline) and writes nothing outside out_dir."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = helpers.repo_snapshot()
    script, overrides = seed_argv(SEED_TRAIN[1])
    run_train(overrides + TINY_MODEL + FAST + ["out_dir=out"])
    assert sorted(os.listdir(cwd)) == ["out"]
    assert (cwd / "out" / "wandb").is_dir() and any((cwd / "out" / "wandb").iterdir())
    assert helpers.repo_snapshot() == before


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory):
    """The README's `train.compile=true` command, shortened and shrunk to one 32-wide layer: compiling the
    README's 8-layer, 512-wide model took 67 s on a 2-core CPU (the tiny one about 25 s, cold cache)."""
    out = tmp_path_factory.mktemp("compiled")
    script, overrides = seed_argv(SEED_TRAIN_COMPILE)
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.chdir(out)
    try:
        cfg = run_train(overrides + FAST + TINY_MODEL + [f"out_dir={out / 'run'}"])
    finally:
        mp.undo()
    return cfg, out


def test_seed_compile_command_runs(compiled_run):
    """The README's PCD + compile + wandb command trains; refine_steps=6 sets think_steps; wandb stays in out_dir."""
    cfg, out = compiled_run
    assert cfg.train.compile and cfg.model.think_steps == 6 and cfg.model.n_persistent == 500
    assert cfg.wandb_name == "h100_8L_512d_pcd10_shakespeare"
    assert sorted(os.listdir(out)) == ["run"]  # the working directory: nothing but out_dir
    assert (out / "run" / "wandb").is_dir()
    ckpt = load_ckpt(out / "run" / "ckpt.pt")
    assert ckpt["chains"][0]["replay_chain"].shape[0] == 500  # PCD: 500 windows keep their chains


def test_compiled_checkpoint_loads_in_sampler(compiled_run, capsys):
    """A checkpoint trained with train.compile=true has no '_orig_mod.' keys and samples."""
    cfg, out = compiled_run
    for name in ("final.pt", "best.pt", "ckpt.pt"):
        keys = load_ckpt(out / "run" / name)["model"].keys()
        assert not [k for k in keys if "_orig_mod" in k], name
    texts = run_sample([f"checkpoint={out / 'run' / 'final.pt'}", "max_new_tokens=20", "prompt=HAMLET:"], capsys)
    assert len(texts) == 1 and texts[0].startswith("HAMLET:") and len(texts[0].rstrip("\n")) >= len("HAMLET:")


# ---------------------------------------------------------------------------------------------------
# seed sampling commands


@pytest.fixture(scope="module")
def shakespeare_ckpt(tmp_path_factory):
    """A tiny checkpoint trained (a few steps) on the default data, tiny Shakespeare."""
    out = tmp_path_factory.mktemp("shakespeare_ckpt")
    run_train(TINY + [f"out_dir={out}"])
    return out / "final.pt"


def _sample_overrides(command, ckpt):
    script, overrides = seed_argv(command)
    assert script == "sample.py"
    assert "checkpoint=out_ebt/final.pt" in overrides
    return [f"checkpoint={ckpt}" if o == "checkpoint=out_ebt/final.pt" else o for o in overrides]


@pytest.mark.parametrize("command", SEED_SAMPLE[1:], ids=lambda c: " ".join(seed_argv(c)[1][1:])[:60])
def test_seed_sample_command_runs(command, shakespeare_ckpt, capsys):
    """Each README sampling command generates 500 new characters (the default max_new_tokens)."""
    texts = run_sample(_sample_overrides(command, shakespeare_ckpt), capsys)
    assert len(texts) == 1
    assert len(texts[0]) == 1 + 500 + 1  # the default prompt "\n", 500 new tokens, print's newline


def test_seed_sample_command_as_subprocess(shakespeare_ckpt):
    """`uv run sample.py checkpoint=... max_new_tokens=500 prompt="HAMLET:"` runs as a program."""
    overrides = _sample_overrides(SEED_SAMPLE[0], shakespeare_ckpt)
    assert "prompt=HAMLET:" in overrides  # the shell removed the quotes
    r = cli(["sample.py", *overrides], uv=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    text = r.stdout.split("---------------")[0]
    assert text.startswith("HAMLET:") and len(text) == len("HAMLET:") + 500 + 1
    assert "500 tokens in" in r.stdout


def test_uv_run_train_py_form(tmp_path):
    """`uv run train.py ...` (no `python`) works from another directory and writes only into out_dir."""
    before = helpers.repo_snapshot()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = cli([str(REPO / "train.py"), "model.use_contrastive=true", "model.contrastive_type=fast_pcd", *TINY,
             "out_dir=run_out"], uv=True, cwd=cwd)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(cwd)) == ["run_out"]  # no outputs/, .hydra, logs or wandb folders
    assert sorted(os.listdir(cwd / "run_out")) == ["best.pt", "ckpt.pt", "final.pt", "metrics.jsonl"]
    assert helpers.repo_snapshot() == before


# ---------------------------------------------------------------------------------------------------
# every documented key lands where it should

DOCUMENTED = {  # override -> (attribute path, expected value)
    "data.data_path=other.txt": ("data.data_path", "other.txt"),
    "data.batch_size=7": ("data.batch_size", 7),
    "data.block_size=33": ("data.block_size", 33),
    "model.softmax_temperature=1.5": ("model.softmax_temperature", 1.5),
    "model.entropy_weight=0.3": ("model.entropy_weight", 0.3),
    "model.aux_ce_weight=0.25": ("model.aux_ce_weight", 0.25),
    "model.think_lr=0.7": ("model.think_lr", 0.7),
    "model.think_max_move=0.125": ("model.think_max_move", 0.125),
    "model.mixture_stopgrad=false": ("model.mixture_stopgrad", False),
    "model.use_contrastive=true": ("model.use_contrastive", True),
    "model.contrastive_type=fast_pcd": ("model.contrastive_type", "fast_pcd"),
    "model.contrastive_k=5": ("model.contrastive_k", 5),
    "model.contrastive_weight=0.2": ("model.contrastive_weight", 0.2),
    "model.langevin_step_size=0.02": ("model.langevin_step_size", 0.02),
    "model.langevin_noise_scale=0.004": ("model.langevin_noise_scale", 0.004),
    "model.langevin_temperature=0.5": ("model.langevin_temperature", 0.5),
    "model.n_layer=3": ("model.n_layer", 3),
    "model.n_head=8": ("model.n_head", 8),
    "model.n_embd=64": ("model.n_embd", 64),
    "model.dropout=0.2": ("model.dropout", 0.2),
    "model.n_persistent=500": ("model.n_persistent", 500),
    "train.max_steps=10000": ("train.max_steps", 10000),
    "train.learning_rate=6e-4": ("train.learning_rate", 6e-4),
    "train.compile=true": ("train.compile", True),
    "train.grad_accum_steps=4": ("train.grad_accum_steps", 4),
    "train.dtype=bfloat16": ("train.dtype", "bfloat16"),
    "wandb_project=nanoebm": ("wandb_project", "nanoebm"),
    "wandb_name=h100_8L_512d_pcd10_shakespeare": ("wandb_name", "h100_8L_512d_pcd10_shakespeare"),
    "out_dir=somewhere": ("out_dir", "somewhere"),
}


def test_every_documented_train_key_lands():
    """Every override key of seeds/001 (and model.refine_steps, an alias of think_steps) sets its field."""
    # (model.energy=mixture: mixture_stopgrad=false would do nothing with the linear energy, and is refused there)
    cfg = helpers.compose_cfg("train", list(DOCUMENTED) + ["model.think_steps=2", "model.refine_steps=6",
                                                           "model.energy=mixture"])
    assert isinstance(cfg, engine.RunConfig)
    for override, (path, expected) in DOCUMENTED.items():
        assert _get(cfg, path) == expected, override
    assert cfg.model.think_steps == 2 and cfg.model.refine_steps == 6
    engine.check_config(cfg)
    assert cfg.model.think_steps == 6  # refine_steps wins: it is the README's name
    # the defaults the README documents under "Common overrides"
    d = helpers.compose_cfg("train", [])
    assert d.data.data_path == "shakespeare.txt" and d.out_dir == "out_ebt" and d.wandb_project is None
    assert (d.model.softmax_temperature, d.model.entropy_weight, d.model.aux_ce_weight) == (1.0, 0.1, 0.1)
    assert (d.model.think_steps, d.model.think_lr, d.model.think_max_move) == (2, 0.5, 0.25)
    assert d.model.mixture_stopgrad is True and d.train.compile is False
    assert (d.train.grad_accum_steps, d.train.dtype) == (1, "float32")


def test_every_documented_sample_key_lands():
    """Every sample.py key of seeds/001 sets its field of SampleConfig."""
    import sample as sample_mod

    cfg = helpers.compose_cfg("sample", ["checkpoint=x/y.pt", "max_new_tokens=17", "prompt=HAMLET:",
                                         "use_thinking=false", "think_steps=4", "topk=64", "sample=true",
                                         "sample_temp=1.2", "sample_top_p=0.9", "seed=3"])
    assert isinstance(cfg, sample_mod.SampleConfig)
    assert (cfg.checkpoint, cfg.max_new_tokens, cfg.prompt) == ("x/y.pt", 17, "HAMLET:")
    assert (cfg.use_thinking, cfg.think_steps, cfg.topk) == (False, 4, 64)
    assert (cfg.sample, cfg.sample_temp, cfg.sample_top_p, cfg.seed) == (True, 1.2, 0.9, 3)
    d = helpers.compose_cfg("sample", [])
    assert d.use_thinking is True and d.sample is False and d.checkpoint == "out_ebt/final.pt"
    # products of experts (docs/experts.md)
    poe = helpers.compose_cfg("sample", ["experts=[a.pt,b.pt]", "expert_weights=[1,0.5]", "ban=eE"])
    assert (poe.experts, poe.expert_weights, poe.ban) == (["a.pt", "b.pt"], [1.0, 0.5], "eE")
    assert (d.experts, d.expert_weights, d.ban) == ([], [], "")


# ---------------------------------------------------------------------------------------------------
# bad input: one line of cause and remedy, non-zero exit, no traceback (real programs, run in parallel)


class Evil:
    """Unpickling this runs a shell command: a checkpoint must never do that."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Run every bad-input case as a real program (in parallel to save time); case -> (result, tmp dir)."""
    tmp = tmp_path_factory.mktemp("bad")
    corpus = helpers.write_corpus(tmp / "corpus.txt", n_chars=3000)  # letters a-t, space, newline
    short = helpers.write_corpus(tmp / "short.txt", n_chars=300)
    run_train(TINY + [f"data.data_path={corpus}", f"out_dir={tmp / 'good'}"])
    good = tmp / "good" / "final.pt"
    truncated = tmp / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp / "foreign.pt"
    torch.save({"weights": torch.zeros(3), "step": 1}, foreign)
    evil_zip = tmp / "evil.pt"
    torch.save({"model": Evil(tmp / "pwned_zip"), "config": {}, "vocab": [], "step": 0}, evil_zip)
    evil_pickle = tmp / "evil.pkl"
    evil_pickle.write_bytes(pickle.dumps(Evil(tmp / "pwned_pickle")))
    incompatible = tmp / "incompatible.pt"
    ck = load_ckpt(good)
    ck["config"]["model"]["n_layer"] = 2  # the weights are for one layer
    torch.save(ck, incompatible)
    old_block = tmp / "gpt2_block.pt"  # a checkpoint of the model before the Llama-style block
    ck = load_ckpt(good)
    ck["model"]["transformer.wpe.weight"] = torch.zeros(16, 32)
    torch.save(ck, old_block)
    missing_shakespeare = tmp / "nodata" / "shakespeare.txt"
    missing_shakespeare.parent.mkdir()
    tiny = [*TINY, f"data.data_path={corpus}", f"out_dir={tmp / 'out'}"]
    no_net = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "",
              "NO_PROXY": ""}
    nan = [*TINY_MODEL, *TINY_DATA, f"data.data_path={corpus}", f"out_dir={tmp / 'nan'}", "train.max_steps=50",
           "train.eval_interval=1", "train.eval_iters=1", "train.log_interval=1", "train.learning_rate=1e3",
           "train.warmup_steps=0", "train.grad_clip=0"]
    cases = {
        "unknown_key": (["train.py", *tiny, "model.foo=1"], {}),
        "mistyped_value": (["train.py", *tiny, "model.n_layer=abc"], {}),
        "n_embd_not_divisible": (["train.py", *tiny, "model.n_embd=30", "model.n_head=4"], {}),
        "negative_think_steps": (["train.py", *tiny, "model.think_steps=-1"], {}),
        "negative_max_steps": (["train.py", *tiny, "train.max_steps=-5"], {}),
        "unknown_dtype": (["train.py", *tiny, "train.dtype=foo"], {}),
        "zero_grad_accum_steps": (["train.py", *tiny, "train.grad_accum_steps=0"], {}),
        "float16_on_cpu": (["train.py", *tiny, "train.dtype=float16", "train.device=cpu"], {}),
        "block_longer_than_data": (["train.py", *tiny, f"data.data_path={short}", "data.block_size=64"], {}),
        "missing_data": (["train.py", *tiny, "data.data_path=/nonexistent/x.txt"], {}),
        "missing_shakespeare_no_network": (["train.py", *tiny, f"data.data_path={missing_shakespeare}"], no_net),
        "resume_without_checkpoint": (["train.py", *tiny, "train.resume=true"], {}),
        "nan_loss": (["train.py", *nan], {}),
        "prompt_outside_vocab": (["sample.py", f"checkpoint={good}", "prompt=abcXYZ", "max_new_tokens=3"], {}),
        "missing_checkpoint": (["sample.py", f"checkpoint={tmp / 'nope' / 'final.pt'}"], {}),
        "corrupt_checkpoint": (["sample.py", f"checkpoint={truncated}"], {}),
        "foreign_checkpoint": (["sample.py", f"checkpoint={foreign}"], {}),
        "incompatible_checkpoint": (["sample.py", f"checkpoint={incompatible}"], {}),
        "old_architecture_checkpoint": (["eval.py", f"checkpoint={old_block}"], {}),
        "code_in_checkpoint": (["sample.py", f"checkpoint={evil_zip}"], {}),
        "code_in_pickle": (["sample.py", f"checkpoint={evil_pickle}"], {}),
        "unquoted_comma_prompt": (["sample.py", f"checkpoint={good}", "prompt=Hello,", "world"], {}),
    }
    # Each real program costs seconds of torch start-up, so a few cases (one of each kind: a Hydra-level
    # error, a run that dies mid-training, a refused checkpoint, a sampler error) run as real programs in
    # parallel; the rest run the same `if __name__ == "__main__"` code in this process (helpers.run_main).
    as_program = {"unknown_key", "nan_loss", "code_in_checkpoint", "code_in_pickle", "unquoted_comma_prompt"}
    results = {}
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(cli, args, tmp, env) for name, (args, env) in cases.items()
                   if name in as_program}
        for name, (args, env) in cases.items():
            if name not in as_program:
                with pytest.MonkeyPatch.context() as mp:
                    for key, value in env.items():
                        mp.setenv(key, value)
                    mp.chdir(tmp)
                    results[name] = helpers.run_main(args[0], args[1:])
        results.update({name: f.result() for name, f in futures.items()})
    return results, tmp


BAD = {  # case -> substrings the one error line must contain
    "unknown_key": ["model.foo"],
    "mistyped_value": ["n_layer", "abc"],
    "n_embd_not_divisible": ["n_embd", "n_head"],
    "negative_think_steps": ["think_steps"],
    "negative_max_steps": ["max_steps"],
    "unknown_dtype": ["train.dtype=foo", "bfloat16"],
    "zero_grad_accum_steps": ["train.grad_accum_steps=0", ">= 1"],
    "float16_on_cpu": ["train.dtype=float16", "CUDA", "train.dtype=bfloat16"],
    "block_longer_than_data": ["block_size"],
    "missing_data": ["/nonexistent/x.txt"],
    "missing_shakespeare_no_network": ["shakespeare.txt", "download"],
    "resume_without_checkpoint": ["ckpt.pt"],
    "nan_loss": ["nan", "ckpt.pt"],
    "prompt_outside_vocab": ["'X'", "'Y'", "'Z'"],
    "missing_checkpoint": ["not found"],
    "corrupt_checkpoint": ["corrupt"],
    "foreign_checkpoint": ["not a nanoEBM checkpoint"],
    "incompatible_checkpoint": ["does not fit"],
    "old_architecture_checkpoint": ["GPT-2-block model", "retrain"],
    "code_in_checkpoint": ["refus"],
    "code_in_pickle": ["refus"],
    "unquoted_comma_prompt": ["'prompt=\"Hello, world\"'"],
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_one_line(case, bad_runs):
    """Bad input exits non-zero with exactly one stderr line 'error: ...' naming the cause, no traceback."""
    results, tmp = bad_runs
    r = results[case]
    assert r.returncode != 0, r.stdout[-1000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error:"), lines[0]
    for part in BAD[case]:
        assert part in lines[0], (part, lines[0])


def test_refused_checkpoints_run_no_code(bad_runs):
    """A checkpoint holding code is refused before any of it runs (no marker file appears)."""
    results, tmp = bad_runs
    assert results["code_in_checkpoint"].returncode != 0 and results["code_in_pickle"].returncode != 0
    assert not (tmp / "pwned_zip").exists() and not (tmp / "pwned_pickle").exists()


def test_failed_download_leaves_no_file(bad_runs):
    """Without network the missing shakespeare.txt is reported and no partial file is left behind."""
    results, tmp = bad_runs
    assert sorted(os.listdir(tmp / "nodata")) == []


def test_nan_loss_keeps_last_good_checkpoint(bad_runs):
    """When the loss becomes NaN the run stops and ckpt.pt from the last good eval is kept, loadable and finite."""
    results, tmp = bad_runs
    assert results["nan_loss"].returncode != 0
    rows = helpers.read_metrics(tmp / "nan")
    assert rows and all(torch.isfinite(torch.tensor(r["val_loss"])) for r in rows)
    ckpt = load_ckpt(tmp / "nan" / "ckpt.pt")
    assert ckpt["step"] == rows[-1]["step"] < 50
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert not (tmp / "nan" / "final.pt").exists()


# ---------------------------------------------------------------------------------------------------
# sample.py behaviour


def test_greedy_is_deterministic(shakespeare_ckpt, capsys):
    """Greedy decoding (sample=false) prints the same text on every run, whatever the seed."""
    base = [f"checkpoint={shakespeare_ckpt}", "max_new_tokens=100", "prompt=HAMLET:"]
    a = run_sample(base, capsys)
    b = run_sample(base, capsys)
    c = run_sample(base + ["seed=99"], capsys)
    assert a == b == c
    assert len(a[0]) == len("HAMLET:") + 100 + 1


def test_sampling_follows_the_seed(shakespeare_ckpt, capsys):
    """sample=true reproduces with the same seed and differs with another seed."""
    base = [f"checkpoint={shakespeare_ckpt}", "max_new_tokens=100", "sample=true", "sample_temp=1.2",
            "sample_top_p=0.9"]
    a = run_sample(base + ["seed=1"], capsys)
    b = run_sample(base + ["seed=1"], capsys)
    c = run_sample(base + ["seed=2"], capsys)
    assert a == b
    assert a != c


@pytest.mark.parametrize("options", [["use_thinking=false"], ["think_steps=4"], ["topk=5"],
                                     ["topk=5", "sample=true"], ["think_steps=0", "num_samples=2"]])
def test_sample_options_run(options, shakespeare_ckpt, capsys):
    """use_thinking=false, think_steps=4 and topk=5 (greedy or sampled) each generate the requested length."""
    texts = run_sample([f"checkpoint={shakespeare_ckpt}", "max_new_tokens=40", "prompt=ROMEO:", *options], capsys)
    assert len(texts) == (2 if "num_samples=2" in options else 1)
    for text in texts:
        assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 40 + 1


def test_topk_one_is_the_system1_argmax(shakespeare_ckpt, capsys):
    """With topk=1 even sampling must pick the System 1 argmax: it equals greedy without thinking."""
    base = [f"checkpoint={shakespeare_ckpt}", "max_new_tokens=60", "prompt=KING:"]
    s1 = run_sample(base + ["use_thinking=false"], capsys)
    top1 = run_sample(base + ["topk=1", "sample=true", "sample_temp=2.0", "seed=5"], capsys)
    assert s1 == top1


# ---------------------------------------------------------------------------------------------------
# every key of the schema is read somewhere


def test_every_config_key_is_read():
    """Each field of the config schemas is used by the code (DESIGN §5: every key is read somewhere)."""
    import dataclasses
    import re

    import sample as sample_mod
    from data import DataConfig
    from model import ModelConfig

    code = "\n".join(p.read_text() for p in REPO.glob("*.py"))
    unread = []
    for schema in (ModelConfig, DataConfig, engine.TrainConfig, engine.RunConfig,
                   sample_mod.SampleConfig):
        for f in dataclasses.fields(schema):
            uses = re.findall(rf"(\.{f.name}\b|[\"']{f.name}[\"'])", code)
            if not uses:
                unread.append(f"{schema.__name__}.{f.name}")
    assert not unread
