"""
Sudoku, generated locally and deterministically from a seed: a puzzle with an exact verifier, for
the question whether thinking (descent on a learned energy over a relaxed candidate grid) pays
where a one-pass answer is hard, in distribution and with fewer givens than trained on (DESIGN
section 16). 6x6 by default (boxes of 2 rows x 3 columns, digits 1-6); 9x9 (3x3 boxes) by the same
code.

Each line of a file is one puzzle, its givens and its unique solution, row by row (0 = blank;
this one has 11 givens):

    040500530000000003200005000010304200 146532532461451623263145625314314256

    uv run sudoku.py            sudoku_train.txt: n_train puzzles with train_givens givens
                                sudoku_test.txt: n_test puzzles per bin of test_bins (in
                                distribution, then fewer and fewer givens), bin after bin

No two puzzles in or across the two files share a solution grid (grids equal up to a relabelling
of digits or a symmetry may: 6x6 has only 49 such classes).

A puzzle is a random full grid (randomized backtracking) with cells blanked in random order while
the solution stays unique, down to a target number of givens (the difficulty); `solve` counts
solutions with bitmasks, up to a limit. `load(path)` reads a file back as tensors and refuses a
malformed one in one line; `verify(givens, candidates)` is the exact verifier, batched in torch.
"""

import random
import sys
import time
from dataclasses import dataclass, field
from typing import List

import hydra
import torch
from hydra.core.config_store import ConfigStore

from data import resolve_path, write_atomically
from util import UserError, check_overrides, run

BOXES = {6: (2, 3), 9: (3, 3)}  # grid size -> (rows, columns) of a box
SIZE = 6
SEED = 1337
# givens (inclusive ranges): training puzzles, and the test bins, in distribution first
TRAIN_GIVENS = {6: [18, 24], 9: [36, 45]}
TEST_BINS = {6: [[18, 24], [15, 17], [12, 14], [9, 11]],
             9: [[36, 45], [31, 35], [27, 30], [23, 26]]}
N_TRAIN = 50_000
N_TEST = 500  # per bin
# the fewest givens a puzzle with one solution can have (known results; 9x9: McGuire et al. 2012)
# (6x6: 8, by exhaustive search; the generator here reaches 8, about one pass in 230)
MIN_GIVENS = {6: 8, 9: 17}
TRIES = 10_000  # removal passes (each on a fresh grid) before a target is given up as out of reach


@dataclass
class SudokuConfig:
    size: int = SIZE  # 6 or 9
    seed: int = SEED
    n_train: int = N_TRAIN
    n_test: int = N_TEST  # puzzles per test bin
    train_givens: List[int] = field(default_factory=list)  # [lo, hi]; empty: TRAIN_GIVENS[size]
    # [[lo, hi], ...]; empty: TEST_BINS[size]. The bin equal to train_givens is in_distribution,
    # the others givens_{lo}_{hi}
    test_bins: List[List[int]] = field(default_factory=list)
    # relative paths: the working directory, else the repo root
    train_path: str = "sudoku_train.txt"
    test_path: str = "sudoku_test.txt"


ConfigStore.instance().store(name="sudoku_schema", node=SudokuConfig)


# --------------------------------------------------------------------------------------------------
# the grid: cells 0..N*N-1 row by row; digits 1..N, 0 blank


def units(size):
    """The 3N units (rows, columns, boxes), each the N cell indices it holds."""
    if size not in BOXES:
        raise UserError(f"size={size}: use size=6 or size=9")
    br, bc = BOXES[size]
    rows = [[r * size + c for c in range(size)] for r in range(size)]
    cols = [[r * size + c for r in range(size)] for c in range(size)]
    boxes = [[(r0 + r) * size + c0 + c for r in range(br) for c in range(bc)]
             for r0 in range(0, size, br) for c0 in range(0, size, bc)]
    return rows + cols + boxes


def cell_units(size):
    """(row, column, box) of every cell: the three units whose masks a cell's digit sets."""
    br, bc = BOXES[size]
    return [(i // size, i % size, (i // size) // br * (size // bc) + (i % size) // bc)
            for i in range(size * size)]


# --------------------------------------------------------------------------------------------------
# the solver: one bit per digit in a mask per row, column and box; the next cell is always the one
# with the fewest candidates (a cell with one is filled at once, one with none ends the branch)


def solve(grid, size=SIZE, limit=2, rng=None):
    """
    (number of solutions found, up to limit; the first solution or None) of grid (N*N digits, 0
    blank). limit=2 answers "is it unique?" without enumerating the rest. With rng the candidate
    digits are tried in random order: solving an empty grid so draws a random full grid.
    """
    where, full = cell_units(size), (1 << size) - 1
    rows, cols, boxes = [0] * size, [0] * size, [0] * size
    grid = list(grid)
    for i, d in enumerate(grid):
        if d:
            r, c, b = where[i]
            bit = 1 << (d - 1)
            if (rows[r] | cols[c] | boxes[b]) & bit:  # a given repeats a digit in a unit
                return 0, None
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
    empties = [i for i, d in enumerate(grid) if not d]
    first = []

    def search(empties):
        if not empties:
            if not first:
                first.append(list(grid))
            return 1
        best, best_mask, best_n = 0, 0, size + 1
        for k, i in enumerate(empties):
            r, c, b = where[i]
            mask = full & ~(rows[r] | cols[c] | boxes[b])
            n = POPCOUNT[mask]
            if n < best_n:
                best, best_mask, best_n = k, mask, n
                if n <= 1:
                    break
        if best_n == 0:
            return 0
        i = empties[best]
        rest = empties[:best] + empties[best + 1:]
        r, c, b = where[i]
        bits = [1 << d for d in range(size) if best_mask >> d & 1]
        if rng is not None:
            rng.shuffle(bits)
        found = 0
        for bit in bits:
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            grid[i] = bit.bit_length()
            found += search(rest)
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
            if found >= limit:
                break
        grid[i] = 0
        return found

    return search(empties), (first[0] if first else None)


POPCOUNT = [bin(m).count("1") for m in range(1 << max(BOXES))]  # candidates in a mask


def count_solutions(grid, size=SIZE, limit=2):
    """Solutions of grid, counted up to limit (2: 0 none, 1 unique, 2 several)."""
    return solve(grid, size, limit)[0]


# --------------------------------------------------------------------------------------------------
# generation


def full_grid(rng, size=SIZE):
    """A random complete grid: backtracking from the empty grid with digits tried in random order
    (every grid can come out, though not all equally often)."""
    return solve([0] * (size * size), size, limit=1, rng=rng)[1]


def remove(rng, solution, target, size=SIZE):
    """
    Givens of solution: blank its cells in random order, each only if the solution stays unique,
    until target givens remain. None when the pass runs out of cells first: the puzzle left is
    then minimal (a cell that could not be blanked never can once more are blank), so another
    order or grid is needed, not more passes over this one.
    """
    givens, left = list(solution), size * size
    order = list(range(size * size))
    rng.shuffle(order)
    for i in order:
        if left == target:
            return givens
        givens[i] = 0
        if count_solutions(givens, size) == 1:
            left -= 1
        else:
            givens[i] = solution[i]
    return givens if left == target else None


def puzzle(rng, target, size=SIZE, exclude=(), tries=TRIES):
    """(givens, solution): a puzzle with exactly `target` givens and a unique solution not in
    exclude (a set of solution tuples), each try on a fresh grid."""
    for _ in range(tries):
        solution = full_grid(rng, size)
        if tuple(solution) in exclude:
            continue
        givens = remove(rng, solution, target, size)
        if givens is not None:
            return givens, solution
    raise UserError(f"no {size}x{size} puzzle with {target} givens in {tries} tries: ask for more "
                    "givens (train_givens, test_bins)")


def puzzles(seed, n, givens_range, size=SIZE, exclude=None):
    """
    n puzzles [(givens, solution), ...], the number of givens uniform in givens_range [lo, hi],
    from random.Random(seed). exclude: a set of solution tuples never used; every solution drawn
    joins it, so that no two puzzles share a solution grid.
    """
    rng, lo, hi = random.Random(seed), *givens_range
    exclude = set() if exclude is None else exclude
    out = []
    for _ in range(n):
        givens, solution = puzzle(rng, rng.randint(lo, hi), size, exclude)
        exclude.add(tuple(solution))
        out.append((givens, solution))
    return out


# --------------------------------------------------------------------------------------------------
# the files: one puzzle a line, `<givens> <solution>`, N*N digits each


def line(givens, solution):
    return "".join(map(str, givens)) + " " + "".join(map(str, solution))


def splits(cfg):
    """
    {name: [(givens, solution), ...]} for the test bins, then "train". The test bins come first,
    each from its own generator (seed * 1000 + k), so that they do not depend on n_train; no two
    puzzles, within or across the files, share a solution grid.
    """
    train_givens, bins = settings(cfg)
    seen, out = set(), {}
    for k, (name, givens_range) in enumerate(bins.items(), start=1):
        out[name] = timed(name, lambda: puzzles(cfg.seed * 1000 + k, cfg.n_test, givens_range,
                                                cfg.size, seen), givens_range)
    out["train"] = timed("train", lambda: puzzles(cfg.seed * 1000, cfg.n_train, train_givens,
                                                  cfg.size, seen), train_givens)
    return out


def timed(name, make, givens_range):
    """make(), with a line saying how many puzzles it made and how fast."""
    t0 = time.perf_counter()
    made = make()
    dt = time.perf_counter() - t0
    print(f"{name}: {len(made):,} puzzles with {givens_range[0]}-{givens_range[1]} givens in "
          f"{dt:.1f} s ({len(made) / max(dt, 1e-9):,.0f} puzzles/s)")
    return made


def settings(cfg):
    """(train givens range, {bin name: givens range}) of cfg, the size's defaults where empty,
    checked: every range within the grid, bins disjoint (a test puzzle's bin is read from its
    number of givens)."""
    cells = cfg.size * cfg.size
    units(cfg.size)  # refuses a size it does not know
    train_givens = cfg.train_givens or TRAIN_GIVENS[cfg.size]
    test_bins = cfg.test_bins or TEST_BINS[cfg.size]
    for name, r in [("train_givens", train_givens), *(("test_bins", r) for r in test_bins)]:
        least = MIN_GIVENS[cfg.size]
        if len(r) != 2 or not least <= r[0] <= r[1] <= cells:
            raise UserError(f"{name}: {list(r)} is not [lo, hi] givens with {least} <= lo <= hi <= "
                            f"{cells} (no {cfg.size}x{cfg.size} puzzle with fewer than {least} "
                            "givens has one solution)")
    ranges = sorted(test_bins)
    for a, b in zip(ranges, ranges[1:]):
        if b[0] <= a[1]:
            raise UserError(f"test_bins {a} and {b} overlap: a bin is told by its givens, so bins "
                            "must not share a number of givens")
    if cfg.n_train < 0 or cfg.n_test < 0:
        raise UserError("n_train and n_test must be >= 0")
    return train_givens, named(test_bins, train_givens)


def named(test_bins, train_givens):
    """{name: [lo, hi]} of test bins [[lo, hi], ...]: in_distribution for the bin that is the
    training range, givens_{lo}_{hi} for the others."""
    return {"in_distribution" if list(r) == list(train_givens) else f"givens_{r[0]}_{r[1]}": list(r)
            for r in test_bins}


def load(path, unique=True):
    """
    (givens (P, N*N) long, solutions (P, N*N) long, givens per puzzle (P,) long) of a puzzle file;
    N (6 or 9) from the line length. Refuses in one line a file with a malformed line, a solution
    that is not a valid grid, givens that disagree with it, or (unique=True) a puzzle with more
    than one solution: solving every puzzle is cheap (50,000 6x6 puzzles load in about 2.4 s with
    it, 0.8 s without, on a busy 2-core CPU).
    """
    path = resolve_path(path)
    remedy = "write it with `uv run sudoku.py`"
    if not path.exists():
        raise UserError(f"{path} does not exist: {remedy}")
    lines = path.read_bytes().split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    if not lines:
        raise UserError(f"{path} holds no puzzles: {remedy}")
    sizes = {2 * n * n + 1: n for n in BOXES}  # line length -> N
    size = sizes.get(len(lines[0]))
    for k, raw in enumerate(lines, start=1):
        if size is None or len(raw) != 2 * size * size + 1:
            lengths = " or ".join(f"{n_chars} ({n}x{n})" for n_chars, n in sizes.items())
            first = "" if size is None else f" (line 1 has {len(lines[0])})"
            raise UserError(f"{path} line {k} has {len(raw)} characters, not {lengths}{first}: "
                            f"one puzzle a line, `<givens> <solution>`; {remedy}")
        cells = size * size
        if not (raw[:cells].isdigit() and raw[cells:cells + 1] == b" " and
                raw[cells + 1:].isdigit()):
            raise UserError(f"{path} line {k} is not `<givens> <solution>` ({cells} digits, a "
                            f"space, {cells} digits): {remedy}")
    digits = torch.frombuffer(bytearray(b"".join(lines)), dtype=torch.uint8).long() - ord("0")
    digits = digits.view(len(lines), 2 * cells + 1)
    givens, solutions = digits[:, :cells], digits[:, cells + 1:]
    bad = (~valid(solutions)).nonzero().flatten().tolist()
    if bad:
        raise UserError(f"{path} line {bad[0] + 1}: the solution is not a valid {size}x{size} grid "
                        f"(each row, column and box holds 1-{size} once): {remedy}")
    bad = ((givens != 0) & (givens != solutions)).any(-1).nonzero().flatten().tolist()
    if bad:
        raise UserError(f"{path} line {bad[0] + 1}: a given disagrees with the solution: {remedy}")
    if unique:
        for k, g in enumerate(givens.tolist()):
            if count_solutions(g, size) != 1:
                raise UserError(f"{path} line {k + 1}: the puzzle has more than one solution: "
                                f"{remedy}")
    return givens, solutions, (givens != 0).sum(-1)


def by_bin(n_givens, bins):
    """{name: row indices (long)} of the puzzles whose number of givens lies in each bin of bins
    {name: [lo, hi]} (a test file's bins, read back from load's third tensor; bins of the defaults:
    named(TEST_BINS[size], TRAIN_GIVENS[size]))."""
    return {name: ((n_givens >= lo) & (n_givens <= hi)).nonzero().flatten()
            for name, (lo, hi) in bins.items()}


# --------------------------------------------------------------------------------------------------
# the exact verifier, batched


def valid(grids):
    """Bool (...) of grids (..., N*N): complete, and every row, column and box holds 1..N once
    (each unit sorted is 1..N; a blank or an out-of-range digit fails)."""
    grids = torch.as_tensor(grids)
    size = round(grids.size(-1) ** 0.5)
    index = torch.tensor(units(size), device=grids.device)  # (3N, N)
    cells = grids[..., index].sort(-1).values  # (..., 3N, N)
    digits = torch.arange(1, size + 1, device=grids.device, dtype=grids.dtype)
    return (cells == digits).all(-1).all(-1)


def verify(givens, candidates):
    """
    Bool (*B, *S) of candidates (*B, *S, N*N) for givens (*B, N*N): the candidate is a valid grid
    and agrees with every given, i.e. it is the puzzle's solution (solutions are unique). The
    givens' batch dimensions lead the candidates', e.g. givens (P, N*N) and M candidates per
    puzzle (P, M, N*N), not aligned from the right as broadcasting would.
    """
    givens, candidates = torch.as_tensor(givens), torch.as_tensor(candidates)
    lead = givens.shape[:-1]
    if candidates.shape[:len(lead)] != lead or candidates.size(-1) != givens.size(-1):
        raise ValueError(f"candidates {tuple(candidates.shape)} do not extend givens "
                         f"{tuple(givens.shape)}: (*B, *S, N*N) for (*B, N*N)")
    extra = candidates.dim() - givens.dim()
    givens = givens.view(*lead, *([1] * extra), givens.size(-1))
    agree = ((givens == 0) | (givens == candidates)).all(-1)
    return valid(candidates) & agree


# --------------------------------------------------------------------------------------------------
# the command


def main_sudoku(cfg: SudokuConfig):
    """Write the test file (the bins, in order) and the training file; returns what was written."""
    made = splits(cfg)
    train = made.pop("train")
    written = {}
    for path, rows in [(cfg.test_path, [p for bin_ in made.values() for p in bin_]),
                       (cfg.train_path, train)]:
        path = resolve_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, "".join(line(g, s) + "\n" for g, s in rows).encode())
        written[str(path)] = len(rows)
        print(f"wrote {len(rows):,} puzzles to {path}")
    return written


@hydra.main(version_base="1.3", config_path="config", config_name="sudoku")
def main(cfg):
    run(main_sudoku, cfg)


if __name__ == "__main__":
    check_overrides("sudoku", sys.argv[1:])
    main()
