"""The Sudoku data (sudoku.py): unique puzzles with the givens asked for, deterministic files, an
exact solver and verifier, a loader that refuses what it cannot trust."""

import random
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import sudoku
from util import UserError

REPO = Path(__file__).resolve().parent.parent
# a valid 6x6 grid (2x3 boxes), checked by hand row, column and box
GRID6 = [1, 2, 3, 4, 5, 6,
         4, 5, 6, 1, 2, 3,
         2, 3, 1, 5, 6, 4,
         5, 6, 4, 2, 3, 1,
         3, 1, 2, 6, 4, 5,
         6, 4, 5, 3, 1, 2]
# the 9x9 puzzle of Wikipedia's "Sudoku" article and its published solution
WIKI = "530070000600195000098000060800060003400803001700020006060000280000419005000080079"
WIKI_SOLUTION = ("534678912672195348198342567859761423426853791713924856961537284287419635"
                 "345286179")
SMALL = ["n_train=60", "n_test=8"]  # a few puzzles in every bin: well under a second


def digits(s):
    return [int(c) for c in s]


def write_splits(tmp_path, overrides=(), name=""):
    """Run the command's config (composed as `uv run sudoku.py overrides` would) into tmp_path;
    returns (test file, train file)."""
    test, train = tmp_path / f"test{name}.txt", tmp_path / f"train{name}.txt"
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base="1.3"):
        cfg = compose("sudoku", overrides=[*SMALL, f"test_path={test}", f"train_path={train}",
                                           *overrides])
    sudoku.run(sudoku.main_sudoku, cfg)
    return test, train


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_splits(tmp_path_factory.mktemp("sudoku"))


def test_generated_puzzles_have_exactly_one_solution_and_it_is_valid():
    """Every puzzle of every 6x6 bin has exactly one solution, the stored one, a valid grid."""
    for lo, hi in [sudoku.TRAIN_GIVENS[6], *sudoku.TEST_BINS[6]]:
        for givens, solution in sudoku.puzzles(lo, 10, [lo, hi]):
            count, found = sudoku.solve(givens, limit=10)
            assert count == 1 and found == solution
            assert sudoku.valid(torch.tensor(solution)).item()
            assert all(g in (0, s) for g, s in zip(givens, solution))


def test_givens_are_what_was_asked():
    """A puzzle has exactly its target number of givens; puzzles() draws targets within the
    range, each one it can reach."""
    rng = random.Random(0)
    for target in (24, 18, 12, 10):
        givens, _ = sudoku.puzzle(rng, target)
        assert sum(g != 0 for g in givens) == target
    counts = {sum(g != 0 for g in givens) for givens, _ in sudoku.puzzles(1, 60, [9, 11])}
    assert counts == {9, 10, 11}


def test_9x9_puzzles_are_unique_with_the_givens_asked():
    """The same code makes 9x9 puzzles (3x3 boxes): unique, valid, with the givens asked for."""
    for givens, solution in sudoku.puzzles(2, 3, [30, 32], size=9):
        assert 30 <= sum(g != 0 for g in givens) <= 32
        assert sudoku.solve(givens, 9, limit=10) == (1, solution)
        assert sudoku.valid(torch.tensor(solution)).item()


def test_the_same_seed_writes_the_same_bytes_and_another_seed_others(tmp_path, files):
    """Two runs with the same seed write byte-identical files; another seed writes other puzzles."""
    again = write_splits(tmp_path, name="again")
    other = write_splits(tmp_path, ["seed=7"], name="other")
    for a, b, c in zip(files, again, other):
        assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()


def test_files_hold_the_bins_and_no_solution_grid_twice(files):
    """The test file holds n_test puzzles per bin, the train file n_train in the training range,
    and no solution grid appears twice in or across the files."""
    test, train = (sudoku.load(path, unique=True) for path in files)
    bins = sudoku.by_bin(test[2], sudoku.named(sudoku.TEST_BINS[6], sudoku.TRAIN_GIVENS[6]))
    assert list(bins) == ["in_distribution", "givens_15_17", "givens_12_14", "givens_9_11"]
    assert [rows.tolist() for rows in bins.values()] == [list(range(k, k + 8))
                                                         for k in range(0, 32, 8)]
    lo, hi = sudoku.TRAIN_GIVENS[6]
    assert len(train[0]) == 60 and ((train[2] >= lo) & (train[2] <= hi)).all()
    solutions = torch.cat([test[1], train[1]])
    assert len(torch.unique(solutions, dim=0)) == len(solutions)


def test_solver_finds_a_known_solution_and_counts_several():
    """solve finds Wikipedia's 9x9 puzzle's published solution (unique), fills a blanked 6x6 box,
    and counts 2 for a swappable rectangle and for the empty grid."""
    assert sudoku.solve(digits(WIKI), 9, limit=10) == (1, digits(WIKI_SOLUTION))
    box = [0 if i % 6 < 3 and i < 12 else d for i, d in enumerate(GRID6)]  # the first box blank
    assert sudoku.solve(box, 6, limit=10) == (1, GRID6)
    # rows 1-2, columns 1 and 4 hold 1 4 / 4 1: swapping them keeps every unit valid
    rectangle = [0 if i in (0, 3, 6, 9) else d for i, d in enumerate(GRID6)]
    assert sudoku.count_solutions(rectangle, 6, limit=10) == 2
    assert sudoku.count_solutions([0] * 36, 6) == 2 and sudoku.count_solutions([0] * 81, 9) == 2
    assert sudoku.solve([1, 1] + [0] * 34, 6) == (0, None)  # a given repeated in a row


def test_verifier_accepts_the_solution_and_rejects_every_kind_of_error():
    """verify accepts the solution; rejects a swapped pair, a row duplicate, a blank, an
    out-of-range digit, and a valid grid that disagrees with a given; batched (P, M, N*N)."""
    solution = torch.tensor(GRID6)
    givens = torch.where(torch.arange(36) % 5 == 0, solution, 0)
    swapped = solution.clone()
    swapped[[0, 1]] = swapped[[1, 0]]  # the row still holds 1-6, its columns no longer do
    duplicate = solution.clone()
    duplicate[1] = duplicate[0]
    blank, big = solution.clone(), solution.clone()
    blank[7], big[7] = 0, 7
    relabelled = torch.tensor([0, 2, 1, 3, 4, 5, 6])[solution]  # 1 <-> 2: valid, disagrees
    candidates = torch.stack([solution, swapped, duplicate, blank, big, relabelled])
    assert sudoku.valid(candidates).tolist() == [True, False, False, False, False, True]
    assert sudoku.verify(givens, candidates[None].expand(1, 6, 36)).tolist() == \
        [[True, False, False, False, False, False]]
    # two puzzles with three candidates each: the givens' batch dimension leads
    two = torch.stack([givens, torch.where(torch.arange(36) % 7 == 0, relabelled, 0)])
    cands = torch.stack([candidates[[0, 5, 1]], candidates[[5, 0, 2]]])
    assert sudoku.verify(two, cands).tolist() == [[True, False, False], [True, False, False]]
    assert sudoku.verify(givens, solution).item()
    with pytest.raises(ValueError):
        sudoku.verify(two, cands[:, :, :35])
    wiki = torch.tensor(digits(WIKI_SOLUTION))
    assert sudoku.verify(torch.tensor(digits(WIKI)), wiki).item()


def test_loader_round_trips_a_written_file(tmp_path):
    """load reads back exactly the puzzles written, with their numbers of givens."""
    made = sudoku.puzzles(3, 20, [9, 24])
    path = tmp_path / "p.txt"
    path.write_text("".join(sudoku.line(g, s) + "\n" for g, s in made))
    givens, solutions, n_givens = sudoku.load(path, unique=True)
    assert givens.dtype == solutions.dtype == n_givens.dtype == torch.long
    assert givens.tolist() == [g for g, _ in made] and solutions.tolist() == [s for _, s in made]
    assert n_givens.tolist() == [sum(d != 0 for d in g) for g, _ in made]
    assert sudoku.verify(givens, solutions).all()


def test_loader_refuses_a_malformed_file_in_one_line(tmp_path):
    """Each kind of bad file is refused with one line that names it (and the line) and the
    command that writes a good one: missing, empty, wrong length, non-digit, invalid solution,
    disagreeing givens, several solutions."""
    good = sudoku.line([0 if i % 6 < 3 and i < 12 else d for i, d in enumerate(GRID6)], GRID6)
    swapped = GRID6[:]
    swapped[0], swapped[1] = swapped[1], swapped[0]
    disagree = [2] + [0] * 35
    several = [0 if i in (0, 3, 6, 9) else d for i, d in enumerate(GRID6)]
    cases = {
        "does not exist": None,
        "no puzzles": "",
        "has 72 characters": good[:-1],
        "is not `<givens> <solution>`": good[:5] + "x" + good[6:],
        "not a valid 6x6 grid": sudoku.line(GRID6, swapped),
        "disagrees": sudoku.line(disagree, GRID6),
        "more than one solution": sudoku.line(several, GRID6),
    }
    for k, (cause, bad) in enumerate(cases.items()):
        path = tmp_path / f"bad{k}.txt"
        if bad is not None:
            path.write_text(f"{good}\n{bad}\n" if bad else "")
        with pytest.raises(UserError) as err:
            sudoku.load(path, unique=True)
        message = str(err.value)
        assert cause in message and "\n" not in message and "uv run sudoku.py" in message
        assert bad in (None, "") or "line 2" in message
    path = tmp_path / "mixed.txt"
    path.write_text(good + "\n" + sudoku.line(digits(WIKI), digits(WIKI_SOLUTION)) + "\n")
    with pytest.raises(UserError, match="line 2 has 163 characters"):
        sudoku.load(path)


def test_bad_settings_are_refused_in_one_line(tmp_path, capsys):
    """An unknown size, a givens range outside the grid or below the fewest givens a unique puzzle
    can have, or overlapping bins: one line, status 2."""
    for bad in (["size=7"], ["train_givens=[20,40]"], ["test_bins=[[7,9]]"],
                ["test_bins=[[10,12],[12,14]]"]):
        with pytest.raises(SystemExit) as exit_:
            write_splits(tmp_path, bad)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
