"""Flag fuzzing (issue 14): every entry script gets random combinations of its own flags, with random
(often invalid) values. Each run must either pass the start-up checks (and reach the launcher, which
is replaced here by a recorder) or exit 2 with one line of error: never a traceback."""
from __future__ import annotations

import argparse
import importlib
import os
import random

import pytest

import src.distributed as D

SCRIPTS = ["main_moco", "main_moco_m", "main_lorac", "main_sogclr", "main_caco", "main_disco", "main_swav",
           "main_swav_distill", "main_pcl", "eval_linear", "eval_knn", "eval_semi"]
INTS = ["-3", "0", "1", "2", "7", "100000000"]
FLOATS = ["-1", "0", "1e-9", "0.5", "3", "nan", "1e12"]
STRS = ["", "x", "/nonexistent/file.pth", "0,1", "resnet18", "true", "-1"]
SKIP = {"-h", "--help", "--dist-url", "--dist_url", "--world-size", "--world_size", "--rank", "--nproc",
        "--multiprocessing-distributed", "--multiprocessing_distributed", "--local_rank", "--local-rank",
        "--dist-backend", "--dist_backend", "--output_dir", "--output-dir", "--dump_path", "--exp-dir",
        "--exp_dir", "--save_dir", "--cache_dir", "--data", "--data_path", "--data-path"}


def _value(action: argparse.Action, rng: random.Random) -> list[str]:
    if action.nargs == 0:
        return []
    if action.choices:
        pool = [str(c) for c in action.choices] + ["not-a-choice"]
    elif action.type is int:
        pool = INTS
    elif action.type is float:
        pool = FLOATS
    else:
        pool = STRS + INTS[:2]
    n = rng.choice([1, 2]) if action.nargs in ("+", "*") else 1
    return [rng.choice(pool) for _ in range(n)]


def _base(parser: argparse.ArgumentParser, data: str, out: str) -> list[str]:
    opts = {o for a in parser._actions for o in a.option_strings}
    base = []
    for flag in ("--output_dir", "--dump_path", "--exp-dir"):
        if flag in opts:
            base += [flag, out]
            break
    if "--data_path" in opts:
        base += ["--data_path", os.path.join(data, "train") if "main_" in parser.prog else data]
    elif any(not a.option_strings and a.dest in ("data", "DIR") for a in parser._actions):
        base += [data]
    elif "--data" in opts:
        base += ["--data", data]
    return base


@pytest.mark.parametrize("script", SCRIPTS)
def test_random_flag_combinations_pass_or_fail_in_one_line(script, tiny_folder, tmp_path, capsys, monkeypatch):
    launched = []
    monkeypatch.setattr(D, "launch", lambda fn, args: launched.append(args))
    mod = importlib.import_module(script)
    parser = mod.get_parser()
    flags = [a for a in parser._actions if a.option_strings and not set(a.option_strings) & SKIP]
    rng = random.Random(hash(script) % 1000)
    outcomes = {"launched": 0, "refused": 0}
    for trial in range(20):
        argv = _base(parser, tiny_folder, str(tmp_path / f"out{trial}"))
        for a in rng.sample(flags, k=min(len(flags), rng.randint(1, 4))):
            argv += [rng.choice(a.option_strings), *_value(a, rng)]
        n = len(launched)
        try:
            mod.main(argv)
        except SystemExit as e:
            err = capsys.readouterr().err
            assert e.code == 2, (argv, err)
            assert "Traceback" not in err, (argv, err)
            assert sum("error" in line for line in err.strip().splitlines()) == 1, (argv, err)
            outcomes["refused"] += 1
            continue
        capsys.readouterr()
        assert len(launched) == n + 1, argv
        outcomes["launched"] += 1
    assert outcomes["launched"] + outcomes["refused"] == 20
