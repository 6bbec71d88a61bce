"""Token files, prepared datasets and batches."""
import numpy as np
import pytest

from mosa_attention.data import DataConfig, DataError, eval_batches, prepare, read_tokens, train_batch, write_tokens
from mosa_attention.data.prepare import open_prepared
from mosa_attention.data.tokens import read_header


def test_token_file_round_trip_uint16_and_uint32(tmp_path):
    ids = np.arange(1000) % 500
    p = write_tokens(tmp_path / "a.bin", ids, vocab_size=500, eos_id=0, num_documents=3)
    back, header = read_tokens(p)
    assert back.dtype == np.uint16 and np.array_equal(back, ids) and header["num_documents"] == 3
    big = np.array([0, 70000, 5])
    back, _ = read_tokens(write_tokens(tmp_path / "b.bin", big, vocab_size=100000, eos_id=0, num_documents=1))
    assert back.dtype == np.uint32 and np.array_equal(back, big)
    assert [f.name for f in tmp_path.iterdir()] and not list(tmp_path.glob(".*tmp*"))


def test_corrupt_token_files_are_reported(tmp_path):
    p = write_tokens(tmp_path / "a.bin", np.arange(100), vocab_size=128, eos_id=0, num_documents=1)
    data = p.read_bytes()
    (tmp_path / "trunc.bin").write_bytes(data[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_tokens(tmp_path / "trunc.bin")
    (tmp_path / "long.bin").write_bytes(data + b"xx")
    with pytest.raises(DataError, match="corrupt"):
        read_tokens(tmp_path / "long.bin")
    (tmp_path / "magic.bin").write_bytes(b"NOTMAGIC" + data[8:])
    with pytest.raises(DataError, match="magic"):
        read_tokens(tmp_path / "magic.bin")
    (tmp_path / "header.bin").write_bytes(data[:12] + b"{broken" + data[19:])
    with pytest.raises(DataError, match="corrupt header"):
        read_header(tmp_path / "header.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(DataError):
        read_tokens(tmp_path / "empty.bin")
    with pytest.raises(DataError, match="must lie in"):
        write_tokens(tmp_path / "x.bin", np.array([5, 200]), vocab_size=128, eos_id=0, num_documents=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    for i in range(60):
        (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, size=80)) + ".")
    return root


def test_prepare_caches_and_round_trips(corpus, tmp_path):
    cfg = DataConfig(source=str(corpus), vocab_size=300, cache_dir=str(tmp_path), val_fraction=0.1, test_fraction=0.1)
    logs = []
    d = prepare(cfg, log=logs.append)
    assert any("training a 300-token BPE" in m for m in logs)
    assert sum(d.meta["splits"][s]["documents"] for s in ("train", "val", "test")) == 60
    train = d.tokens("train")
    assert int((train == d.tokenizer.eos_id).sum()) == d.meta["splits"]["train"]["documents"]
    first_doc = d.tokenizer.decode(train[: int(np.flatnonzero(train == d.tokenizer.eos_id)[0])].tolist())
    assert first_doc in [(corpus / f).read_text() for f in sorted(p.name for p in corpus.iterdir())]
    logs.clear()
    again = prepare(cfg, log=logs.append)
    assert again.root == d.root and any("using cached" in m for m in logs)
    assert prepare(DataConfig(**{**cfg.__dict__, "vocab_size": 320}), log=logs.append).root != d.root
    # the prepared folder is itself a source (e.g. carried to a GPU machine)
    carried = prepare(DataConfig(source=str(d.root)))
    assert np.array_equal(carried.tokens("val"), d.tokens("val"))
    with pytest.raises(DataError, match="split must be"):
        d.tokens("dev")


def test_single_token_file_source(corpus, tmp_path):
    d = prepare(DataConfig(source=str(corpus), vocab_size=300, cache_dir=str(tmp_path)), log=lambda *a: None)
    solo = tmp_path / "solo"
    solo.mkdir()
    d.tokenizer.save(solo / "tokenizer.json")
    write_tokens(solo / "all.bin", d.tokens("train"), vocab_size=d.tokenizer.vocab_size, eos_id=d.tokenizer.eos_id,
                 num_documents=0)
    s = open_prepared(solo / "all.bin")
    eos = d.tokenizer.eos_id
    assert sum(len(s.tokens(k)) for k in ("train", "val", "test")) == len(d.tokens("train"))
    for k in ("train", "val", "test"):
        assert len(s.tokens(k)) and s.tokens(k)[-1] == eos  # cut at document ends


def test_prepare_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="not found"):
        prepare(DataConfig(source=str(tmp_path / "missing"), cache_dir=str(tmp_path)))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(DataError, match="no text"):
        prepare(DataConfig(source=str(tmp_path / "empty"), cache_dir=str(tmp_path)))
    with pytest.raises(DataError, match="tokenizer must be|not found"):
        prepare(DataConfig(source="wiki", tokenizer="nonsense", cache_dir=str(tmp_path), max_documents=20))


def test_batches_are_a_function_of_seed_and_step_and_split_into_rows():
    tokens = np.arange(10_000) % 1000
    x, y = train_batch(tokens, 16, 8, seed=1, step=3)
    assert x.shape == (8, 16) and bool((x[:, 1:] == y[:, :-1]).all())
    x2, _ = train_batch(tokens, 16, 8, seed=1, step=3)
    assert bool((x == x2).all()) and not bool((x == train_batch(tokens, 16, 8, seed=1, step=4)[0]).all())
    halves = [train_batch(tokens, 16, 8, 1, 3, rows=slice(i * 4, i * 4 + 4))[0] for i in range(2)]
    assert bool((np.concatenate(halves) == x.numpy()).all())
    windows = list(eval_batches(tokens, 100, 7, max_windows=20))
    assert sum(len(b[0]) for b in windows) == 20 and int(windows[0][0][1, 0]) == 100
    r0 = list(eval_batches(tokens, 100, 7, max_windows=21, rank=0, world_size=2))
    r1 = list(eval_batches(tokens, 100, 7, max_windows=21, rank=1, world_size=2))
    assert sum(len(b[0]) for b in r0) == sum(len(b[0]) for b in r1) == 10
    with pytest.raises(DataError, match="fewer than one window"):
        list(eval_batches(tokens[:50], 100, 4))


def test_token_writer_streams_chunks_and_leaves_nothing_on_failure(tmp_path):
    from mosa_attention.data.tokens import TokenWriter

    with TokenWriter(tmp_path / "s.bin", vocab_size=1000, eos_id=0) as w:
        for i in range(5):
            w.write(np.arange(i * 100, i * 100 + 100))
        w.close(num_documents=5)
    ids, header = read_tokens(tmp_path / "s.bin")
    assert np.array_equal(ids, np.arange(500)) and header["num_documents"] == 5
    with pytest.raises(RuntimeError):
        with TokenWriter(tmp_path / "f.bin", vocab_size=1000, eos_id=0) as w:
            w.write(np.arange(10))
            raise RuntimeError("disk gone")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin"]


def test_full_disk_while_preparing_leaves_nothing(corpus, tmp_path, monkeypatch):
    import errno

    import mosa_attention.data.tokens as tokens_mod

    real_open = open

    def full_disk(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "w" in mode:
            def write(data):
                raise OSError(errno.ENOSPC, "No space left on device")
            f.write = write
        return f

    monkeypatch.setattr(tokens_mod, "open", full_disk, raising=False)
    with pytest.raises(DataError, match="no space left on device.*Nothing was left behind"):
        prepare(DataConfig(source=str(corpus), vocab_size=300, cache_dir=str(tmp_path)), log=lambda *a: None)
    assert list((tmp_path / "data").iterdir()) == []
