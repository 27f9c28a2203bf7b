"""Bad input, table-driven: every case gets one error line naming the file, line or field, no
traceback, and leaves an existing run untouched. The CLI runs in-process (`raftlm.cli.main`)."""

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from tiny import save_tiny_model

from raftlm.cli import main as cli_main
from raftlm.run.lock import run_lock

REWARDS = """
def digits(prompts, completions, **columns):
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]

def raises(prompts, completions, **columns):
    raise RuntimeError("scorer crashed")

def nan_reward(prompts, completions, **columns):
    return [float("nan")] * len(completions)

def too_few(prompts, completions, **columns):
    return [0.0]

def text_scores(prompts, completions, **columns):
    return ["high"] * len(completions)

NOT_A_FUNCTION = 3
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A model, prompt files, rewards and one completed run that no case may change."""
    root = tmp_path_factory.mktemp("bad")
    save_tiny_model(root / "model")
    rows = [{"prompt": f"Say {i}", "answer": str(i)} for i in range(6)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "rewards.py").write_text(REWARDS)
    (root / "existing").mkdir()
    config = settings(root, output_dir=str(root / "existing"))
    (root / "existing.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(["train", "--config", str(root / "existing.yaml")]) == 0
    return root


def settings(root: Path, **run) -> dict:
    return {
        "run": {"output_dir": str(root / "out"), "seed": 1, **run},
        "model": {"path": str(root / "model"), "dtype": "fp32", "lora": {"r": 2, "alpha": 4}},
        "data": {"train_file": str(root / "train.jsonl")},
        "raft": {"stages": 1, "prompts_per_stage": 2, "samples_per_prompt": 2},
        "generation": {"max_new_tokens": 3},
        "reward": {"terms": [f"{root / 'rewards.py'}:digits"]},
        "evaluation": {"enabled": False},
        "tracking": {"report": False},
    }


def fingerprint(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def train_with(ws: Path, change=None, extra=()) -> list[str]:
    """argv for `raftlm train` on a config changed by `change(config_dict)`."""
    config = settings(ws.parent)
    config["run"]["output_dir"] = str(ws / "out")
    if change:
        change(config)
    (ws / "config.yaml").write_text(yaml.safe_dump(config))
    return ["train", "--config", str(ws / "config.yaml"), *extra]


def write(ws: Path, name: str, text: str) -> Path:
    (ws / name).write_text(text)
    return ws / name


def prompts(ws, text, name="p.jsonl"):
    return train_with(ws, lambda c: c["data"].update(train_file=str(write(ws, name, text))))


def reward(ws, spec):
    return train_with(ws, lambda c: c["reward"].update(terms=[spec]))


def model(ws, path):
    return train_with(ws, lambda c: c["model"].update(path=str(path)))


def model_folder(ws, files: dict) -> Path:
    folder = ws / "badmodel"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def existing(ws) -> Path:
    return ws.parent / "existing"


def damaged_config_run(ws):
    shutil.copytree(existing(ws), ws / "copy")
    (ws / "copy/config.yaml").write_text("run: [broken\n")
    return ["train", "--resume", str(ws / "copy")]


def all_checkpoints_damaged(ws):
    shutil.copytree(existing(ws), ws / "copy")
    for adapter in (ws / "copy/checkpoints").glob("*/policy/adapter_model.safetensors"):
        adapter.write_bytes(b"garbage")
    return ["train", "--resume", str(ws / "copy")]


def old_pickle_checkpoint(ws):
    shutil.copytree(existing(ws), ws / "copy")
    for folder in (ws / "copy/checkpoints").glob("stage-*"):
        for name in ("manifest.json", "trainer_state.json", "trainer_state.safetensors"):
            (folder / name).unlink()
        (folder / "trainer_state.pt").write_bytes(b"\x80\x04pickle")
    return ["train", "--resume", str(ws / "copy")]


def read_only_parent(ws):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    (ws / "locked").mkdir()
    os.chmod(ws / "locked", 0o500)
    return train_with(ws, lambda c: c["run"].update(output_dir=str(ws / "locked/run")))


CASES = [
    # --- config file and fields
    ("config file missing", lambda ws: ["train", "--config", str(ws / "nope.yaml")],
     "config file not found"),
    ("config invalid YAML", lambda ws: ["train", "--config", str(write(ws, "c.yaml", "a: [b"))],
     "invalid YAML"),
    ("config top level a list", lambda ws: ["train", "--config", str(write(ws, "c.yaml", "- 1"))],
     "top level must be a mapping"),
    ("unknown key", lambda ws: train_with(ws, lambda c: c["raft"].update(stags=2)),
     "did you mean 'raft.stages'"),
    ("unknown section", lambda ws: train_with(ws, lambda c: c.update(rafts={})), "rafts"),
    ("wrong type", lambda ws: train_with(ws, lambda c: c["raft"].update(stages="many")),
     "raft.stages must be int"),
    ("fractional int", lambda ws: train_with(ws, lambda c: c["raft"].update(stages=1.5)),
     "raft.stages"),
    ("out of range", lambda ws: train_with(ws, lambda c: c["raft"].update(stages=0)),
     "raft.stages: expected >= 1"),
    ("bad backend", lambda ws: train_with(ws, lambda c: c["generation"].update(backend="x")),
     "generation.backend"),
    ("temperature 0", lambda ws: train_with(ws, lambda c: c["generation"].update(temperature=0)),
     "generation.temperature"),
    ("top_p 0", lambda ws: train_with(ws, lambda c: c["generation"].update(top_p=0)),
     "generation.top_p"),
    ("negative lr", lambda ws: train_with(ws, lambda c: c.setdefault("training", {}).update(
        learning_rate=-1)),
     "training.learning_rate"),
    ("bad strategy", lambda ws: train_with(ws, lambda c: c.update(selection={"strategy": "x"})),
     "selection.strategy"),
    ("bad bool", lambda ws: train_with(ws, lambda c: c["run"].update(overwrite="maybe")),
     "run.overwrite must be bool"),
    ("null field", lambda ws: train_with(ws, lambda c: c["raft"].update(stages=None)),
     "raft.stages must not be null"),
    ("section not a mapping", lambda ws: train_with(ws, lambda c: c.update(raft=3)),
     "raft must be a mapping"),
    ("no prompts configured", lambda ws: train_with(ws, lambda c: c["data"].update(
        train_file=None)), "data: set `task`"),
    ("reward term with name and model", lambda ws: reward(ws, {"name": "x", "model": "y"}),
     "reward.terms[0]"),
    ("override without =", lambda ws: train_with(ws, extra=["--set", "raft.stages"]),
     "expected key.sub=value"),
    ("override of unknown key", lambda ws: train_with(ws, extra=["--set", "raft.stags=2"]),
     "did you mean 'raft.stages'"),
    ("neither --config nor --resume", lambda ws: ["train"], "give --config"),
    # --- prompt files
    ("prompt file missing", lambda ws: train_with(ws, lambda c: c["data"].update(
        train_file=str(ws / "none.jsonl"))), "none.jsonl"),
    ("unsupported prompt file type", lambda ws: prompts(ws, "x", name="p.txt"), "p.txt"),
    ("malformed JSONL line", lambda ws: prompts(ws, '{"prompt": "a"}\n{"prompt": \n'),
     "p.jsonl:2"),
    ("JSONL line not an object", lambda ws: prompts(ws, '{"prompt": "a"}\n[1, 2]\n'),
     "p.jsonl:2"),
    ("missing prompt field", lambda ws: prompts(ws, '{"question": "a"}\n'),
     "missing field 'prompt'"),
    ("empty prompt file", lambda ws: prompts(ws, "\n"), "p.jsonl"),
    ("prompt not text", lambda ws: prompts(ws, '{"prompt": 5}\n'), "p.jsonl:1"),
    ("malformed chat message", lambda ws: prompts(ws, '{"prompt": [{"role": "user"}]}\n'),
     "message 0"),
    ("JSON file not a list", lambda ws: prompts(ws, '{"prompt": "a"}', name="p.json"),
     "p.json"),
    ("all prompts too long", lambda ws: train_with(ws, lambda c: c["data"].update(
        max_prompt_tokens=1)), "max_prompt_tokens"),
    ("eval file missing", lambda ws: train_with(ws, lambda c: c["data"].update(
        eval_file=str(ws / "heldout.jsonl"))), "heldout.jsonl"),
    # --- rewards
    ("reward file missing", lambda ws: reward(ws, f"{ws}/nope.py:digits"), "nope.py"),
    ("reward function missing", lambda ws: reward(ws, f"{ws.parent}/rewards.py:absent"),
     "absent"),
    ("reward not callable", lambda ws: reward(ws, f"{ws.parent}/rewards.py:NOT_A_FUNCTION"),
     "NOT_A_FUNCTION"),
    ("reward file syntax error", lambda ws: reward(ws, f"{write(ws, 'r.py', 'def (:')}:f"),
     "r.py"),
    ("reward module missing", lambda ws: reward(ws, "no_such_package.rewards:f"),
     "no_such_package"),
    ("unknown built-in reward", lambda ws: reward(ws, "accuracy_please"), "accuracy_please"),
    # The function's file and line, and the switch that shows the traceback (issue 34.6).
    ("reward raises", lambda ws: reward(ws, f"{ws.parent}/rewards.py:raises"),
     "rewards.py:6 in raises) for item 0"),
    ("reward returns NaN", lambda ws: reward(ws, f"{ws.parent}/rewards.py:nan_reward"),
     "nan_reward"),
    ("reward returns too few", lambda ws: reward(ws, f"{ws.parent}/rewards.py:too_few"),
     "too_few"),
    ("reward returns text", lambda ws: reward(ws, f"{ws.parent}/rewards.py:text_scores"),
     "text_scores"),
    ("reward model folder missing", lambda ws: reward(ws, {"model": str(ws / "rm")}), "rm"),
    # --- model folders
    ("model path missing", lambda ws: model(ws, ws / "nomodel"), "model.path"),
    ("model folder without config.json", lambda ws: model(ws, model_folder(ws, {"x": ""})),
     "badmodel"),
    ("model config.json corrupt", lambda ws: model(ws, model_folder(ws, {"config.json": "{"})),
     "badmodel"),
    ("gguf file missing", lambda ws: model(ws, ws / "m.gguf"), "m.gguf"),
    # --- run directories, permissions, disk, concurrency
    ("existing run without --overwrite", lambda ws: ["train", "--config",
                                                     str(ws.parent / "existing.yaml")],
     "already holds a run"),
    ("resume of a missing folder", lambda ws: ["train", "--resume", str(ws / "gone")],
     "no such run directory"),
    ("resume where nothing started", lambda ws: (ws.joinpath("empty").mkdir(),
                                                 ["train", "--resume", str(ws / "empty")])[1],
     "nothing was started there"),
    ("resume with a broken config.yaml", damaged_config_run, "invalid YAML"),
    ("resume with every checkpoint damaged", all_checkpoints_damaged, "no intact checkpoint"),
    ("resume of an old pickle checkpoint", old_pickle_checkpoint, "old pickle format"),
    ("output under a read-only folder", read_only_parent, "permission denied"),
    ("output_dir is a file", lambda ws: train_with(ws, lambda c: c["run"].update(
        output_dir=str(write(ws, "afile", "")))), "afile"),
    ("eval of a missing checkpoint", lambda ws: ["eval", "--config",
                                                 str(ws.parent / "existing.yaml"),
                                                 "--checkpoint", str(ws / "ckpt")], "ckpt"),
    ("report of a missing run", lambda ws: ["report", str(ws / "norun")], "norun"),
]


@pytest.mark.parametrize("name, make_argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_line(base, capsys, name, make_argv, expected):
    before = fingerprint(base / "existing")
    argv = make_argv(Path(tempfile.mkdtemp(dir=base)))  # a folder of its own next to `base`
    capsys.readouterr()
    code = cli_main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("raftlm ")]
    assert code == 2, err
    assert len(errors) == 1 and expected in errors[0], err
    assert "Traceback" not in err
    assert fingerprint(base / "existing") == before


@pytest.mark.parametrize("extra", [[], ["--overwrite"]], ids=["train", "--overwrite"])
def test_a_running_run_refuses_a_second_writer_and_is_untouched(base, capsys, extra):
    before = fingerprint(base / "existing")
    with run_lock(base / "existing"):
        code = cli_main(["train", "--config", str(base / "existing.yaml"), *extra])
        resumed = cli_main(["train", "--resume", str(base / "existing")])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == resumed == 2 and len(errors) == 2 and all("in use" in e for e in errors)
    assert fingerprint(base / "existing") == before


def test_disk_full_is_one_line_naming_the_resume_command(base, capsys, monkeypatch):
    from raftlm.run import rundir

    tmp_path = Path(tempfile.mkdtemp(dir=base))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out/x"))

    monkeypatch.setattr(rundir, "_write_and_rename", full)
    assert cli_main(train_with(tmp_path)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "no space left" in errors[0]
    assert f"raftlm train --resume {tmp_path / 'out'}" in errors[0]


# --- a reward server's bad answers: one line naming term, URL, status and the body ------------


@pytest.fixture(scope="module")
def bad_reward_server():
    """A reward server that answers every request in one wrong way per path."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    from raftlm.tools.serve_reward import serving

    async def count(request):
        return len(json.loads(await request.body())["completions"])

    async def not_json(request):
        return PlainTextResponse("<html>upstream timed out</html>")

    async def wrong_count(request):
        return JSONResponse({"rewards": [0.5]})

    async def nan(request):
        return Response(json.dumps({"rewards": [float("nan")] * await count(request)}),
                        media_type="application/json")

    async def error_500(request):
        return PlainTextResponse("database exploded", status_code=500)

    async def slow(request):
        await asyncio.sleep(0.9)  # past the timeout, within the shutdown grace
        return JSONResponse({"rewards": [0.0] * await count(request)})

    paths = {"/notjson": not_json, "/wrongcount": wrong_count, "/nan": nan,
             "/error500": error_500, "/slow": slow}
    app = Starlette(routes=[Route(p, f, methods=["POST"]) for p, f in paths.items()])
    with serving(app) as url:
        yield url


REMOTE_CASES = [
    ("answer not JSON", "/notjson", {}, "HTTP 200 but the answer is not JSON: '<html>upstream"),
    ("wrong number of rewards", "/wrongcount", {}, "answered 1 rewards for 4 completions"),
    ("NaN reward", "/nan", {}, "answered nan for completion 0"),
    ("HTTP 500", "/error500", {"retry_s": 0.6}, "HTTP 500: 'database exploded' (gave up after"),
    ("no answer in time", "/slow", {"timeout_s": 0.3}, "no answer within timeout_s=0.3 s"),
]


@pytest.mark.parametrize("name, path, settings, expected", REMOTE_CASES,
                         ids=[c[0] for c in REMOTE_CASES])
def test_a_reward_servers_bad_answer_gets_one_clear_line(base, bad_reward_server, capsys, name,
                                                         path, settings, expected):
    before = fingerprint(base / "existing")
    url = bad_reward_server + path
    ws = Path(tempfile.mkdtemp(dir=base))
    term = {"url": url, "label": "scorer", **settings}
    capsys.readouterr()
    code = cli_main(train_with(ws, lambda c: c["reward"].update(terms=[term])))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("raftlm ")]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert f"reward 'scorer' POST {url}: " in errors[0] and expected in errors[0], errors[0]
    assert fingerprint(base / "existing") == before
