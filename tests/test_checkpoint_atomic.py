"""A save over an existing checkpoint, killed at any moment, leaves the old or the new checkpoint
loadable, never a mix: a forked child saves and dies (os._exit, like SIGKILL: no cleanup runs)
just before its k-th filesystem call, for every k until the save completes; after each death the
folder must load, bit for bit, as the old model or the new one, and the next save must work."""

from __future__ import annotations

import builtins
import multiprocessing as mp
import os
import shutil
import stat

import pytest
import torch

from minimax01 import MiniMaxForCausalLM, ModelConfig
from minimax01.checkpoint import CheckpointError, save_pretrained
from minimax01.tokenizer import ByteTokenizer

KILLED = 17


def make_model(seed):
    torch.manual_seed(seed)
    return MiniMaxForCausalLM(ModelConfig.from_preset("debug")).eval()


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(model, reference):
    sd = model.state_dict()
    return sd.keys() == reference.keys() and all(torch.equal(sd[k], reference[k]) for k in sd)


def _die_at(k):
    """Patch every filesystem-changing call so that the k-th one kills the process first."""
    import safetensors.torch

    count = [0]

    def wrap(fn):
        def inner(*args, **kwargs):
            count[0] += 1
            if count[0] == k:
                os._exit(KILLED)
            return fn(*args, **kwargs)
        return inner

    for name in ("replace", "rename", "unlink", "remove", "rmdir", "mkdir", "fsync", "chmod"):
        setattr(os, name, wrap(getattr(os, name)))
    safetensors.torch.save_file = wrap(safetensors.torch.save_file)
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            count[0] += 1
            if count[0] == k:
                os._exit(KILLED)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = open_


def _child(k, model, path, kwargs):
    torch.set_num_threads(1)
    _die_at(k)
    save_pretrained(model, path, **kwargs)
    os._exit(0)


def save_killed_at(k, model, path, kwargs) -> bool:
    """True if the child died at step k; False if the save finished in fewer steps."""
    proc = mp.get_context("fork").Process(target=_child, args=(k, model, path, kwargs))
    proc.start()
    proc.join()
    assert proc.exitcode in (0, KILLED), proc.exitcode
    return proc.exitcode == KILLED


SCENARIOS = {  # (old save, new save); 250KB: 6 shards of the debug model, 400KB: 4
    "6 shards -> 1 file": (dict(max_shard_size="250KB"), dict()),
    "1 file -> 4 shards": (dict(), dict(max_shard_size="400KB")),
    "legacy shards -> hf shards, tokenizer": (dict(max_shard_size="400KB"),
                                              dict(dialect="hf", max_shard_size="250KB",
                                                   tokenizer=ByteTokenizer())),
    "nothing -> sharded": (None, dict(max_shard_size="400KB")),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_a_save_killed_at_any_step_leaves_old_or_new(tmp_path, scenario):
    old_kwargs, new_kwargs = SCENARIOS[scenario]
    old, new, third = make_model(0), make_model(1), make_model(2)
    old_sd, new_sd = state(old), state(new)
    seen = set()
    k = 0
    while True:
        k += 1
        path = tmp_path / f"k{k}"
        if old_kwargs is not None:
            save_pretrained(old, path, **old_kwargs)
        if not save_killed_at(k, new, path, new_kwargs):
            break
        try:
            loaded = MiniMaxForCausalLM.from_pretrained(path)
        except (FileNotFoundError, CheckpointError):
            assert old_kwargs is None, f"killed at step {k}: no loadable checkpoint"
            seen.add("none")
        else:
            if same(loaded, old_sd):
                seen.add("old")
            else:
                assert same(loaded, new_sd), f"killed at step {k}: a mix of old and new"
                seen.add("new")
        if k % 3 == 1:  # the next save finishes or discards the killed one, leaving a clean folder
            save_pretrained(third, path)
            assert same(MiniMaxForCausalLM.from_pretrained(path), state(third))
            left = set(os.listdir(path)) - {"tokenizer_config.json"}
            assert left == {"config.json", "model.safetensors"}, (k, left)
        shutil.rmtree(path)
    assert k > 10  # the save really has many steps, and every one of them was tried
    assert seen == ({"none", "new"} if old_kwargs is None else {"old", "new"}), seen
    final = tmp_path / f"k{k}"
    assert same(MiniMaxForCausalLM.from_pretrained(final), new_sd)
    assert not any(name.startswith(".") for name in os.listdir(final))


def test_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        make_model(0).save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    finally:
        os.umask(old)
    for f in os.listdir(tmp_path / "ckpt"):
        assert stat.S_IMODE(os.stat(tmp_path / "ckpt" / f).st_mode) == 0o644, f
