"""VL training on 2 gloo ranks (train/vl_parallel.py): FSDP2, EP x FSDP2 and ETP x FSDP2
compute what one process computes (per-step losses, the first step's gradients of tower,
projector and LM, the exported weights); each rank reads its own rows; stage 1 leaves the LM
untouched under FSDP; a resume (on 2 ranks, or resharded onto 1 process) equals the
uninterrupted run; a rank without images keeps FSDP's collectives in step; CP is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("PIL")

from safetensors.torch import load_file, save_file  # noqa: E402

from dist_utils import run_workers  # noqa: E402
from minimax01.train.config_io import resolve  # noqa: E402
from minimax01.train.vl_train import run_vl  # noqa: E402
from minimax01.vision import VLConfig  # noqa: E402
from minimax01.vision.model import MiniMaxVLForConditionalGeneration  # noqa: E402

LAYOUTS = {"fsdp": [("parallel.dp_shard", "2")],
           "ep": [("parallel.dp_shard", "2"), ("parallel.ep", "2")],
           "etp": [("parallel.dp_shard", "2"), ("parallel.etp", "2")]}


def config(out_dir, steps=3, extra=()):
    return resolve("vl-demo", None, [
        ("train.steps", str(steps)), ("train.batch_size", "2"), ("train.seq_len", "400"),
        ("train.eval_batches", "1"), ("train.log_every", "1"), ("train.save_every", "2"),
        ("train.export", "true"), ("train.out_dir", str(out_dir)), ("optim.warmup_steps", "1"),
        ("optim.eps", "1e-6"), *extra])


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def grab_grads(into: dict):
    """on_backward: every trainable parameter's gradient at step 0 (gathered: all ranks)."""
    def hook(step, model):
        if step == 0:
            for n, p in model.named_parameters():
                if p.grad is not None:
                    into[n] = _full(p.grad).detach().clone().contiguous()
    return hook


def _train(rank, world_size, out_dir, steps, extra, files):
    grads = {}
    result = run_vl(config(out_dir, steps, extra), log=lambda *a: None,
                    on_backward=grab_grads(grads))
    if rank == 0:
        save_file(grads, files + ".grads.safetensors")
        with open(files + ".json", "w") as f:
            json.dump({"losses": result.losses, "step": result.step}, f)


def spawn(tmp_path, name, steps, extra):
    files = str(tmp_path / f"{name}-out")
    run_workers(_train, 2, str(tmp_path / name), steps, list(extra), files)
    with open(files + ".json") as f:
        info = json.load(f)
    return info["losses"], load_file(files + ".grads.safetensors")


def exported(path):
    return MiniMaxVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).state_dict()


def assert_states_close(a, b, rtol=1e-5, atol=1e-7):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_ranks_equal_one_process(tmp_path, layout):
    grads_one = {}
    one = run_vl(config(tmp_path / "one"), log=lambda *a: None, on_backward=grab_grads(grads_one))
    losses, grads = spawn(tmp_path, "two", 3, LAYOUTS[layout])
    assert len(losses) == 3 and losses == pytest.approx(one.losses, rel=1e-5)
    parts = {k.split(".")[0] for k in grads_one}
    assert parts == {"vision_tower", "multi_modal_projector", "image_newline", "language_model"}
    assert any("experts" in k for k in grads_one)
    assert_states_close(grads_one, grads, atol=1e-8)
    # the updated weights. Adam's step lr * g / (|g| + eps) turns a rounding-level difference
    # of a near-zero gradient into up to lr / eps times as much: optim.eps = 1e-6 bounds that
    assert_states_close(exported(tmp_path / "one/model"), exported(tmp_path / "two/model"),
                        atol=1e-6)


def test_stage1_frozen_and_resume_on_two_ranks_and_resharded(tmp_path):
    extra = LAYOUTS["ep"] + [("train.freeze", "stage1")]
    losses, grads = spawn(tmp_path, "full", 4, extra)
    assert grads and not any(k.startswith("language_model.") for k in grads)
    full = exported(tmp_path / "full/model")
    torch.manual_seed(config(tmp_path).train.seed)  # the run's initial weights
    start = MiniMaxVLForConditionalGeneration(VLConfig.from_preset("vl-debug")).float().state_dict()
    lm = [k for k in start if k.startswith("language_model.")]
    assert lm and all(torch.equal(start[k], full[k]) for k in lm)
    for part in ("vision_tower.", "multi_modal_projector.", "image_newline"):
        assert any(not torch.equal(start[k], full[k]) for k in start if k.startswith(part)), part

    for name in ("part", "one"):  # interrupted after the step-2 checkpoint
        shutil.copytree(tmp_path / "full", tmp_path / name)
        shutil.rmtree(tmp_path / name / "checkpoints/step_00000004")
        shutil.rmtree(tmp_path / name / "model")
    resumed, _ = spawn(tmp_path, "part", 4, extra)  # 2 ranks resume
    assert resumed == losses[2:]
    assert_states_close(full, exported(tmp_path / "part/model"), rtol=0, atol=0)
    one = run_vl(config(tmp_path / "one", 4, [("train.freeze", "stage1")]), log=lambda *a: None)
    assert one.losses == pytest.approx(losses[2:], rel=1e-5)  # 1 process resumes 2 ranks' run
    assert_states_close(full, exported(tmp_path / "one/model"), atol=1e-6)


def test_rank_batches_split_the_global_batch():
    from minimax01.tokenizer import ByteTokenizer
    from minimax01.train.vl_parallel import ExampleStream, RankBatches
    from minimax01.train.vl_train import _examples
    from minimax01.vision import ImageProcessor

    cfg = config("unused")
    vcfg = VLConfig.from_preset("vl-debug")
    proc, tok = ImageProcessor.from_config(vcfg), ByteTokenizer()

    def batches(rank, size, rows=4, start=0):
        stream = ExampleStream(_examples(cfg, tok, proc, vcfg.image_token_index, 0, start), start)
        return RankBatches(stream, rows, 400, 0, rank, size)

    whole, halves = batches(0, 1), [batches(0, 2), batches(1, 2)]
    for _ in range(2):
        b, (r0, r1) = whole.next_batch(), [h.next_batch() for h in halves]
        assert r0["input_ids"].shape == (1, 800)
        assert torch.equal(torch.cat([r0["input_ids"], r1["input_ids"]], 1), b["input_ids"])
        assert torch.equal(torch.cat([r0["labels"], r1["labels"]], 1), b["labels"])
        assert torch.equal(torch.cat([r0["cu_seqlens"], r1["cu_seqlens"][1:] + 800]),
                           b["cu_seqlens"])
        assert r0["images"] + r1["images"] == b["images"] and r0["images"] and r1["images"]
    state = whole.state_dict()  # a resumed stream continues with the same rows
    again = batches(0, 1, start=state["position"])
    assert torch.equal(again.next_batch()["input_ids"], whole.next_batch()["input_ids"])


def test_context_parallel_is_refused(tmp_path):
    with pytest.raises(ValueError, match="context parallelism is not supported"):
        run_vl(config(tmp_path / "cp", 1, [("parallel.cp", "2"), ("parallel.dp_shard", "1")]))


def test_a_rank_without_images_still_runs_the_tower(tmp_path):
    """JSONL rows alternate image chats and text-only chats, one per row: rank 1 never has an
    image, yet every rank must run the tower's collectives; the result is one process's."""
    from minimax01.train.data.synthetic_images import write_image_dataset

    path = write_image_dataset(tmp_path / "data", 2, size=56)
    text = json.dumps({"messages": [{"role": "user", "content": "say " + "x" * 40},
                                    {"role": "assistant", "content": "y" * 20}]})
    path.write_text("".join(f"{line}\n{text}\n" for line in path.read_text().splitlines()))
    extra = [("data.source", str(path)), ("train.seq_len", "200")]
    grads_one = {}
    one = run_vl(config(tmp_path / "one", 2, extra), log=lambda *a: None,
                 on_backward=grab_grads(grads_one))
    losses, grads = spawn(tmp_path, "two", 2, LAYOUTS["fsdp"] + extra)
    assert losses == pytest.approx(one.losses, rel=1e-5)
    assert any(k.startswith("vision_tower.") for k in grads)
    assert_states_close(grads_one, grads, atol=1e-8)
