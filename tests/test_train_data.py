"""Data: sources stream and resume exactly, packing makes correct targets and segments, the
held-out split is disjoint, data-parallel ranks split the global batch."""

import json
from pathlib import Path

import pytest
import torch

from minimax01.tokenizer import ByteTokenizer
from minimax01.train.config_io import from_preset
from minimax01.train.data import IGNORE_INDEX, Packer, TokenStream, TrainData, collate, make_example
from minimax01.train.data.sources import PIECE_BYTES, open_source, stdlib_shards

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")
TOK = ByteTokenizer()


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def test_packing_targets_segments_and_overlap(tmp_path):
    docs = ["abcdefg", "hij", "klmnopqrstuvwxyz"]
    shards = open_source(str(write_jsonl(tmp_path / "d.jsonl", docs)))
    stream = TokenStream(shards, TOK, "train", 0.0, shuffle=False, add_bos=True, add_eos=True)
    packer = Packer(stream, seq_len=8, pad_id=TOK.pad_id)
    flat = []  # the token stream: <bos> doc <eos> per document
    for d in docs:
        flat += [TOK.bos_id] + list(d.encode()) + [TOK.eos_id]
    starts = set()
    pos = 0
    for d in docs:
        starts.add(pos)
        pos += len(d) + 2
    flat, starts = flat + flat, starts | {s + len(flat) for s in starts}  # the next epoch
    for r in range(4):
        inputs, targets, lengths = packer.next_row()
        lo = r * 8  # rows overlap by one token: row r covers flat[8r : 8r + 9]
        assert inputs == flat[lo:lo + 8]
        for i in range(8):
            j = lo + i + 1
            expect = IGNORE_INDEX if j in starts else flat[j]
            assert targets[i] == expect, (r, i)
        # a segment starts at the row start and at every document start inside the row
        cuts = [0] + [i for i in range(1, 8) if lo + i in starts] + [8]
        assert lengths == [b - a for a, b in zip(cuts, cuts[1:])]


def test_collate_builds_packed_batch():
    rows = [([1, 2, 3, 4], [2, 3, -100, 5], [3, 1]), ([6, 7, 8, 9], [7, 8, 9, 10], [4])]
    b = collate(rows)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 6, 7, 8, 9]]
    assert b["cu_seqlens"].tolist() == [0, 3, 4, 8] and b["cu_seqlens"].dtype == torch.int32
    assert b["num_targets"] == 7


def test_stream_resumes_exactly_everywhere():
    shards = stdlib_shards()[:40]
    ref = TokenStream(shards, TOK, "train", 0.05, seed=3)
    packer = Packer(ref, 96, TOK.pad_id)
    states, rows = [], []
    for _ in range(60):
        states.append(json.loads(json.dumps(ref.state_dict())))
        rows.append(packer.next_row())
    for k in (0, 1, 17, 59):
        s = TokenStream(shards, TOK, "train", 0.05, seed=3)
        s.load_state_dict(states[k])
        p = Packer(s, 96, TOK.pad_id)
        assert [p.next_row() for _ in range(len(rows) - k)] == rows[k:]


def test_epochs_reshuffle_and_loop(tmp_path):
    docs = [f"document number {i}" for i in range(6)]
    for i, d in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(d)
    shards = open_source(str(tmp_path))
    s = TokenStream(shards, TOK, "train", 0.0, seed=1)
    orders = [s.order(e) for e in range(3)]
    assert sorted(orders[0]) == list(range(6)) and orders[0] != orders[1]
    toks, _ = s.take(10 * sum(len(d) + 2 for d in docs))  # ten epochs' worth
    assert s.epoch >= 9
    assert TOK.decode(toks).count("document number 3") >= 9


def test_text_file_streams_in_pieces_and_reassembles():
    shard = open_source(str(SHAKESPEARE))[0]
    units = list(shard.units())
    assert len(units) > 200 and all(len(u.text.encode()) < PIECE_BYTES + 200 for u in units)
    assert "".join(u.text for u in units) == SHAKESPEARE.read_text()
    assert units[0].new_doc and not any(u.new_doc for u in units[1:])
    assert units[-1].ends_doc and not any(u.ends_doc for u in units[:-1])
    again = list(shard.units(units[100].pos))
    assert again == units[100:]


def test_long_lines_are_cut_at_utf8_boundaries(tmp_path):
    text = ("é" * 50000 + "\n") * 2  # 100 KB lines of two-byte characters
    path = tmp_path / "long.txt"
    path.write_text(text)
    units = list(open_source(str(path))[0].units())
    assert "".join(u.text for u in units) == text and "\ufffd" not in "".join(u.text for u in units)


def test_held_out_split_is_disjoint_and_stable():
    shards = open_source(str(SHAKESPEARE))
    units = list(shards[0].units())
    train = list(TokenStream(shards, TOK, "train", 0.1).units())
    held = list(TokenStream(shards, TOK, "eval", 0.1).units())
    held_pos, train_pos = {u.pos for u in held}, {u.pos for u in train}
    assert held_pos and not (held_pos & train_pos)
    assert held_pos | train_pos == {u.pos for u in units}
    assert 0.03 < len(held_pos) / len(units) < 0.2
    # independent of the seed; a piece that follows a hole in its split starts a document
    assert [u.pos for u in TokenStream(shards, TOK, "eval", 0.1, seed=9).units()] == [u.pos for u in held]
    for split in (train, held):
        mine = {u.pos for u in split}
        for u in split:
            i = next(k for k, v in enumerate(units) if v.pos == u.pos)
            assert u.new_doc == (i == 0 or units[i - 1].pos not in mine), (u.pos, i)


def test_hf_saved_dataset_and_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = [f"row {i}: " + "x" * i for i in range(30)]
    table = pa.table({"id": list(range(30)), "text": docs})
    # what `datasets.Dataset.save_to_disk` writes: Arrow IPC stream files plus two JSON files
    folder = tmp_path / "saved"
    folder.mkdir()
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=7):
                writer.write_batch(batch)
    (folder / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": None}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=8)
    for src in (folder, tmp_path / "t.parquet"):
        shard = open_source(str(src))[0]
        assert [u.text for u in shard.units()] == docs
        assert [u.pos for u in shard.units(19)] == list(range(19, 30))
    with pytest.raises(ValueError, match="no column 'body'"):
        list(open_source(str(folder), text_field="body")[0].units())
    # a DatasetDict folder: the train split
    dd = tmp_path / "dd"
    (dd / "train").mkdir(parents=True)
    for f in folder.iterdir():
        (dd / "train" / f.name).write_bytes(f.read_bytes())
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    assert [u.text for u in open_source(str(dd))[0].units()] == docs


def test_synthetic_tasks_are_deterministic():
    for task in ("passkey", "needle", "mqar"):
        a, b = make_example(task, 5, seed=1, length=500), make_example(task, 5, seed=1, length=500)
        c = make_example(task, 6, seed=1, length=500)
        assert a == b and a.text != c.text
        assert 300 < len(a.text) <= 500 and a.answer and a.text.endswith(a.answer)
    ex = make_example("passkey", 0, length=1000, depth=0.0)
    assert ex.answer in ex.prompt[:300]
    ex = make_example("needle", 0, length=1000, depth=1.0)
    assert ex.answer in ex.prompt[-200:]
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_example("sudoku", 0)


def test_synthetic_source_streams_without_end():
    shards = open_source("synthetic", synthetic_tasks=["mqar", "passkey"], synthetic_length=200)
    stream = TokenStream(shards, TOK, "train", 0.02)
    toks, _ = stream.take(5000)
    assert len(toks) == 5000 and "Remember:" in TOK.decode(toks) and "pass key" in TOK.decode(toks)


def _make(path, data):
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "missing"), "no such file or folder"),
    (lambda p: str(p), "no non-empty data files"),
    (lambda p: _make(p / "e.txt", b""), "is empty"),
    (lambda p: _make(p / "x.bin", b"\0"), "unknown file type"),
])
def test_bad_sources_are_clear_errors(tmp_path, make, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        open_source(make(tmp_path))


def test_jsonl_without_the_text_field(tmp_path, capsys):
    path = str(write_jsonl(tmp_path / "d.jsonl", ["a", "b"], field="content"))
    with pytest.raises(ValueError, match=r"d.jsonl line 1: no string field 'text'.*data.strict"):
        list(open_source(path, strict=True)[0].units())
    assert list(open_source(path)[0].units()) == []  # skipped, each with a warning
    assert capsys.readouterr().err.count("set data.text_field") == 2
    assert [u.text for u in open_source(path, text_field="content")[0].units()] == ["a", "b"]


def test_malformed_jsonl_lines_are_skipped_counted_and_named(tmp_path, capsys):
    lines = [b'{"text": "one"}', b'{"text": "tw', b'', b'{"text": "three"}', b'[1, 2]',
             b'{"text": "\xff\xfe"}', b'{"text": 5}', b'{"text": "' + "f\u00fcr".encode() + b'"}']
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    shard = open_source(str(path))[0]
    assert [u.text for u in shard.units()] == ["one", "three", "f\u00fcr"]
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(" line ")[1].split(":")[0] for line in err] == ["2", "5", "6", "7"]
    assert "not valid JSON" in err[0] and "(1 bad line(s)" in err[0]
    assert "not UTF-8" in err[2] and "(4 bad line(s)" in err[3]
    assert all(str(path) in line for line in err)
    # a resumed stream starts mid-file and still names the right line, and warns only once
    pos = [u.pos for u in shard.units()]
    assert [u.text for u in shard.units(pos[1])] == ["three", "f\u00fcr"]
    assert capsys.readouterr().err == ""
    fresh = open_source(str(path))[0]
    list(fresh.units(pos[1]))
    assert " line 5:" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"d.jsonl line 2: not valid JSON .*data.strict is true"):
        list(open_source(str(path), strict=True)[0].units())


def test_non_utf8_text_names_the_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8 text \(byte 3\)"):
        list(open_source(str(path))[0].units())


def test_symlinks_in_data_folders(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "a.txt").write_text("hello\n")
    (data / "alias").symlink_to(data / "sub")          # a second way to the same folder: read once
    assert [s.name for s in open_source(str(data))] == ["alias/a.txt"]
    (data / "sub" / "loop").symlink_to(data)           # a loop back to the top
    with pytest.raises(ValueError, match="symlink loop"):
        open_source(str(data))
    (data / "sub" / "loop").unlink()
    (data / "x.txt").symlink_to(data / "y.txt")
    (data / "y.txt").symlink_to(data / "x.txt")        # two links pointing at each other
    with pytest.raises(ValueError, match=r"x.txt is a symlink loop"):
        open_source(str(data))
    with pytest.raises(ValueError, match="dangling symlink or a symlink loop"):
        open_source(str(data / "x.txt"))


def test_data_parallel_ranks_split_the_global_batch(tmp_path):
    cfg = from_preset("debug")
    cfg.train.batch_size, cfg.train.seq_len = 4, 32
    whole = TrainData(cfg, TOK)
    ranks = [TrainData(cfg, TOK, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(3):
        full = whole.next_batch()
        parts = [d.next_batch() for d in ranks]
        assert torch.equal(torch.cat([p["input_ids"] for p in parts], 1), full["input_ids"])
        assert torch.equal(torch.cat([p["labels"] for p in parts], 1), full["labels"])
        assert parts[0]["input_ids"].shape == (1, 64)
        assert ranks[0].state_dict() == ranks[1].state_dict() == whole.state_dict()
    with pytest.raises(ValueError, match="multiple of the data-parallel size 3"):
        TrainData(cfg, TOK, dp_rank=0, dp_size=3)


def test_eval_batches_are_fixed_and_padded(tmp_path):
    cfg = from_preset("debug")
    cfg.data.source = str(write_jsonl(tmp_path / "d.jsonl", [f"doc {i} " * 5 for i in range(200)]))
    cfg.data.eval_fraction = 0.05
    cfg.train.batch_size, cfg.train.seq_len = 2, 32
    data = TrainData(cfg, TOK)
    a, b = data.eval_batches(100), data.eval_batches(100)
    assert len(a) < 100 and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert a[-1]["labels"].shape == (1, 64)
    cfg.data.eval_fraction = 1e-9
    with pytest.raises(ValueError, match="held-out split .* has no text"):
        TrainData(cfg, TOK).eval_batches(2)
