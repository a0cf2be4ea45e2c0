"""Training checkpoint save / verify / load: minimax01's pickle-free format against
torch.distributed.checkpoint (DCP, what the trainer used before), same model, same process.

    python benchmarks/train_checkpoint.py                      # the 1b preset on CUDA (~12 GiB)
    python benchmarks/train_checkpoint.py --preset debug --device cpu    # a quick CPU check

One AdamW step gives the optimizer its state; then each format saves model + optimizer, a fresh
model and optimizer load it back, and the loaded state must equal the saved one exactly (the
script exits 1 otherwise). Prints a table of seconds and GB/s (checkpoint bytes / time)."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minimax01.checkpoint import sharded  # noqa: E402
from minimax01.config import ModelConfig  # noqa: E402
from minimax01.model import MiniMaxForCausalLM  # noqa: E402
from minimax01.parallel import checkpoint as pckpt  # noqa: E402


def build(cfg, device, seed):
    torch.manual_seed(seed)
    with torch.device(device):
        model = MiniMaxForCausalLM(cfg).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt


def one_step(model, opt, device):
    ids = torch.randint(0, model.config.vocab_size, (1, 512), device=device)
    model(ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def same(model, opt, ref_model, ref_opt) -> bool:
    for (n, a), (_, b) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        if not torch.equal(a, b):
            print(f"MISMATCH weight {n}")
            return False
    for p, q in zip(model.parameters(), ref_model.parameters()):
        for k, v in ref_opt.state[q].items():
            if not torch.equal(torch.as_tensor(opt.state[p][k]).cpu(), torch.as_tensor(v).cpu()):
                print(f"MISMATCH optimizer {k}")
                return False
    return True


def dcp_save(path, model, opt):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd

    m, o = sd.get_state_dict(model, opt)
    dcp.save({"model": m, "optim": o}, storage_writer=dcp.FileSystemWriter(str(path),
                                                                             sync_files=True))


def dcp_load(path, model, opt):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd

    m, o = sd.get_state_dict(model, opt)
    state = {"model": m, "optim": o}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)))
    sd.set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="1b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = ModelConfig.from_preset(args.preset)
    model, opt = build(cfg, device, 0)
    one_step(model, opt, device)
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt-bench-"))
    rows, ok = [], True
    print(f"{args.preset}: {cfg.num_parameters() / 1e9:.2f}B parameters on {device}, "
          f"torch {torch.__version__}, writing under {root}", flush=True)
    for name, save, load, verify in (
            ("minimax01 (safetensors+JSON)", pckpt.save, lambda f, m, o: pckpt.load(f, m, o, verify=False),
             sharded.verify),
            ("torch DCP (pickle metadata)", dcp_save, dcp_load, None)):
        folder = root / name.split()[0]
        shutil.rmtree(folder, ignore_errors=True)
        sync(device)
        t0 = time.perf_counter()
        save(folder, model, opt)
        sync(device)
        t_save = time.perf_counter() - t0
        size = folder_bytes(folder)
        t_verify = None
        if verify is not None:
            t0 = time.perf_counter()
            verify(folder)
            t_verify = time.perf_counter() - t0
        fresh, fresh_opt = build(cfg, device, 1)
        one_step(fresh, fresh_opt, device)  # different values until loaded
        sync(device)
        t0 = time.perf_counter()
        load(folder, fresh, fresh_opt)
        sync(device)
        t_load = time.perf_counter() - t0
        good = same(fresh, fresh_opt, model, opt)
        ok = ok and good
        rows.append((name, size, t_save, t_verify, t_load, good))
        del fresh, fresh_opt
        shutil.rmtree(folder, ignore_errors=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{'format':30} {'GB':>7} {'save s':>8} {'GB/s':>6} {'verify s':>9} {'load s':>8} "
          f"{'GB/s':>6}  exact")
    for name, size, ts, tv, tl, good in rows:
        gb = size / 1e9
        tv_s = f"{tv:9.1f}" if tv is not None else f"{'-':>9}"
        print(f"{name:30} {gb:7.2f} {ts:8.1f} {gb / ts:6.2f} {tv_s} {tl:8.1f} {gb / tl:6.2f}  "
              f"{'yes' if good else 'NO'}")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
