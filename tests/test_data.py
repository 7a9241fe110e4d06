"""training/data.py: the CIFAR pickle readers, their errors, and DeviceData's batching."""
import os
import pickle

import numpy as np
import pytest
import torch

import training.data as data_mod
from conftest import make_cifar
from training.data import DataError, DeviceData, epoch_permutation, load_cifar

C10 = "cifar-10-batches-py"
C100 = "cifar-100-python"


def read_raw(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def test_cifar10_reader(tmp_path):
    d = make_cifar(str(tmp_path), "cifar10", n_train=50, n_test=20, seed=3)
    out = load_cifar("cifar10", d, download=False)
    (xtr, ytr), (xte, yte) = out["train"], out["test"]
    assert xtr.shape == (50, 3, 32, 32) and xte.shape == (20, 3, 32, 32)
    assert xtr.dtype == torch.uint8 and ytr.dtype == torch.int64 and yte.dtype == torch.int64
    assert ytr.shape == (50,) and yte.shape == (20,)
    assert 0 <= int(ytr.min()) and int(ytr.max()) < 10
    # the order of the files (data_batch_1..5) and of the rows inside them is kept
    raws = [read_raw(os.path.join(d, C10, f"data_batch_{i}")) for i in range(1, 6)]
    assert np.array_equal(xtr.numpy().reshape(50, -1), np.concatenate([r[b"data"] for r in raws]))
    assert ytr.tolist() == sum((list(r[b"labels"]) for r in raws), [])
    test = read_raw(os.path.join(d, C10, "test_batch"))
    assert np.array_equal(xte.numpy().reshape(20, -1), test[b"data"])
    assert yte.tolist() == list(test[b"labels"])
    # channel-major rows: the first 1024 bytes are the red plane
    assert np.array_equal(xtr[0, 0].numpy().ravel(), raws[0][b"data"][0, :1024])


def test_cifar100_reader(tmp_path):
    d = make_cifar(str(tmp_path), "cifar100", n_train=30, n_test=12, seed=4)
    out = load_cifar("cifar100", d, download=False)
    (xtr, ytr), (xte, yte) = out["train"], out["test"]
    assert xtr.shape == (30, 3, 32, 32) and xte.shape == (12, 3, 32, 32)
    assert xtr.dtype == torch.uint8 and ytr.dtype == torch.int64
    train = read_raw(os.path.join(d, C100, "train"))
    assert ytr.tolist() == list(train[b"fine_labels"])
    assert np.array_equal(xtr.numpy().reshape(30, -1), train[b"data"])
    assert 0 <= int(ytr.min()) and int(ytr.max()) < 100
    test = read_raw(os.path.join(d, C100, "test"))
    assert yte.tolist() == list(test[b"fine_labels"])


def write_batch(path, data, labels, label_key="labels", as_bytes=True):
    key = (lambda k: k.encode()) if as_bytes else (lambda k: k)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({key("data"): data, key(label_key): labels}, f)


def test_str_keys_accepted(tmp_path):
    d = make_cifar(str(tmp_path), "cifar10", n_train=10, n_test=4)
    data = np.arange(4 * 3072, dtype=np.int64).reshape(4, 3072) % 256
    write_batch(os.path.join(d, C10, "test_batch"), data.astype(np.uint8), np.array([9, 0, 3, 3]), as_bytes=False)
    (_, _), (xte, yte) = load_cifar("cifar10", d, download=False).values()
    assert yte.tolist() == [9, 0, 3, 3]
    assert np.array_equal(xte.numpy().reshape(4, -1), data.astype(np.uint8))


def test_missing_files_and_failed_download(tmp_path, monkeypatch):
    calls = []

    def fail(dataset, data_dir):
        calls.append((dataset, data_dir))
        raise OSError("network unreachable")

    monkeypatch.setattr(data_mod, "_download", fail)
    for dataset, folder, url in (("cifar10", C10, "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
                                 ("cifar100", C100, "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz")):
        d = str(tmp_path / dataset)
        with pytest.raises(DataError) as e:
            load_cifar(dataset, d, download=True)
        msg = str(e.value)
        assert f"{d}/{folder}" in msg and url in msg and "network unreachable" in msg
        assert "\n" not in msg
        assert calls[-1] == (dataset, d)


def test_missing_files_without_download(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "_download", lambda *a: pytest.fail("must not download"))
    d = make_cifar(str(tmp_path), "cifar10", n_train=10, n_test=4)
    os.remove(os.path.join(d, C10, "data_batch_3"))
    with pytest.raises(DataError) as e:
        load_cifar("cifar10", d, download=False)
    assert "data_batch_3" in str(e.value) and "cifar-10-python.tar.gz" in str(e.value)


@pytest.mark.parametrize("dataset,folder,remove", [
    ("cifar10", C10, ["data_batch_2", "data_batch_5"]), ("cifar10", C10, ["test_batch"]),
    ("cifar100", C100, ["train"]), ("cifar100", C100, ["test"])])
@pytest.mark.parametrize("download", [True, False])
def test_a_partial_copy_names_its_missing_files_and_is_not_downloaded_over(tmp_path, monkeypatch, dataset, folder,
                                                                           remove, download):
    """Some of the files there, some not: one line naming the missing ones, and no download (issue 23)."""
    monkeypatch.setattr(data_mod, "_download", lambda *a: pytest.fail("must not download over a partial copy"))
    d = make_cifar(str(tmp_path), dataset, n_train=10, n_test=4)
    for f in remove:
        os.remove(os.path.join(d, folder, f))
    with pytest.raises(DataError) as e:
        load_cifar(dataset, d, download=download)
    msg = str(e.value)
    assert "\n" not in msg and f"{d}/{folder}/" in msg and "incomplete" in msg
    assert f"missing {', '.join(remove)}" in msg and "download failed" not in msg
    assert "nothing was downloaded" in msg and "remove the folder" in msg


@pytest.mark.parametrize("dataset,folder,meta", [("cifar10", C10, "batches.meta"), ("cifar100", C100, "meta")])
def test_a_copy_of_only_the_label_names_is_partial_too(tmp_path, monkeypatch, dataset, folder, meta):
    monkeypatch.setattr(data_mod, "_download", lambda *a: pytest.fail("must not download over a partial copy"))
    os.makedirs(tmp_path / folder)
    (tmp_path / folder / meta).write_bytes(b"label names")
    with pytest.raises(DataError, match="is incomplete: missing"):
        load_cifar(dataset, str(tmp_path), download=True)


def test_download_that_leaves_files_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "_download", lambda *a: None)
    with pytest.raises(DataError) as e:
        load_cifar("cifar100", str(tmp_path), download=True)
    assert "train" in str(e.value) and "test" in str(e.value)


def test_download_not_called_when_files_present(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "_download", lambda *a: pytest.fail("must not download"))
    d = make_cifar(str(tmp_path), "cifar100", n_train=4, n_test=4)
    assert len(load_cifar("cifar100", d, download=True)["train"][1]) == 4


def corrupt(tmp_path, how):
    d = make_cifar(str(tmp_path), "cifar10", n_train=10, n_test=4)
    path = os.path.join(d, C10, "data_batch_2")
    if how == "truncated":
        raw = open(path, "rb").read()
        open(path, "wb").write(raw[: len(raw) // 2])
    elif how == "garbage":
        open(path, "wb").write(os.urandom(3000))
    elif how == "empty":
        open(path, "wb").close()
    elif how == "text":
        open(path, "w").write("this is not a pickle\n")
    elif how == "wrong_shape":
        write_batch(path, np.zeros((2, 3000), np.uint8), [0, 1])
    elif how == "too_few_labels":
        write_batch(path, np.zeros((2, 3072), np.uint8), [0])
    elif how == "label_too_big":
        write_batch(path, np.zeros((2, 3072), np.uint8), [0, 10])
    elif how == "negative_label":
        write_batch(path, np.zeros((2, 3072), np.uint8), [-1, 3])
    elif how == "missing_labels_key":
        write_batch(path, np.zeros((2, 3072), np.uint8), [0, 1], label_key="fine_labels")
    elif how == "not_a_dict":
        with open(path, "wb") as f:
            pickle.dump([1, 2, 3], f)
    return d, path


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "text", "wrong_shape", "too_few_labels",
                                 "label_too_big", "negative_label", "missing_labels_key", "not_a_dict"])
def test_malformed_file_names_the_file(tmp_path, how):
    d, path = corrupt(tmp_path, how)
    with pytest.raises(DataError) as e:
        load_cifar("cifar10", d, download=False)
    assert path in str(e.value)


def test_cifar100_label_range_is_100(tmp_path):
    d = make_cifar(str(tmp_path), "cifar100", n_train=4, n_test=4)
    write_batch(os.path.join(d, C100, "test"), np.zeros((2, 3072), np.uint8), [99, 100], label_key="fine_labels")
    with pytest.raises(DataError) as e:
        load_cifar("cifar100", d, download=False)
    assert os.path.join(d, C100, "test") in str(e.value)
    write_batch(os.path.join(d, C100, "test"), np.zeros((2, 3072), np.uint8), [99, 0], label_key="fine_labels")
    assert load_cifar("cifar100", d, download=False)["test"][1].tolist() == [99, 0]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["top", "inside"])
def test_pickle_that_runs_code_is_refused(tmp_path, where):
    marker = tmp_path / "pwned"
    d = make_cifar(str(tmp_path / "data"), "cifar10", n_train=10, n_test=4)
    path = os.path.join(d, C10, "test_batch")
    payload = _Evil(str(marker))
    obj = payload if where == "top" else {b"data": np.zeros((1, 3072), np.uint8), b"labels": payload}
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    assert b"system" in open(path, "rb").read()  # the file really asks for os.system
    with pytest.raises(DataError) as e:
        load_cifar("cifar10", d, download=False)
    assert path in str(e.value)
    assert not marker.exists(), "the pickle's code ran"


# ---- DeviceData ------------------------------------------------------------------------------------------

def indexed_data(n):
    """Image i is filled with i % 256 and labelled i, so every batch shows which examples it holds."""
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    return DeviceData(images, torch.arange(n), "cpu")


def ids(batches):
    out = []
    for x, y in batches:
        assert x.shape == (len(y), 3, 32, 32) and x.dtype == torch.uint8
        assert torch.equal(x[:, 0, 0, 0], (y % 256).to(torch.uint8))  # images and labels stay paired
        out.append(y.tolist())
    return out


def test_train_batches_drop_the_last_partial_batch():
    data = indexed_data(23)
    assert len(data) == 23 and data.steps_per_epoch(5) == 4
    batches = ids(data.train_batches(5, seed=0, epoch=0))
    assert len(batches) == 4 and all(len(b) == 5 for b in batches)
    flat = sum(batches, [])
    assert len(set(flat)) == 20 and set(flat) <= set(range(23))
    assert flat == epoch_permutation(23, 0, 0)[:20].tolist()


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    a, b = indexed_data(40), indexed_data(40)
    e0 = ids(a.train_batches(8, seed=1, epoch=0))
    torch.manual_seed(123)  # the global RNG does not matter
    assert ids(b.train_batches(8, seed=1, epoch=0)) == e0
    assert ids(a.train_batches(8, seed=1, epoch=0)) == e0
    e1 = ids(a.train_batches(8, seed=1, epoch=1))
    assert e1 != e0 and sorted(sum(e1, [])) == sorted(sum(e0, [])) == list(range(40))
    assert ids(a.train_batches(8, seed=2, epoch=0)) != e0
    assert sum(e0, []) != list(range(40))  # shuffled
    assert torch.equal(epoch_permutation(40, 1, 5), epoch_permutation(40, 1, 5))


def test_start_step_skips_exactly():
    data = indexed_data(37)
    full = ids(data.train_batches(6, seed=3, epoch=2))
    for start in range(len(full) + 1):
        assert ids(data.train_batches(6, seed=3, epoch=2, start_step=start)) == full[start:]


@pytest.mark.parametrize("n,batch,world", [(50, 4, 3), (64, 8, 2), (37, 5, 4)])
def test_rank_shards_are_disjoint_and_cover_the_trimmed_permutation(n, batch, world):
    data = indexed_data(n)
    steps = n // (batch * world)
    assert data.steps_per_epoch(batch, world) == steps
    shards = [ids(data.train_batches(batch, seed=7, epoch=1, rank=r, world_size=world)) for r in range(world)]
    for shard in shards:
        assert len(shard) == steps and all(len(b) == batch for b in shard)
    flat = [sum(s, []) for s in shards]
    for i in range(world):
        for j in range(i + 1, world):
            assert not set(flat[i]) & set(flat[j])
    trimmed = epoch_permutation(n, 7, 1)[: steps * batch * world].tolist()
    assert sorted(sum(flat, [])) == sorted(trimmed)
    # step s of every rank together is one global batch of the trimmed permutation
    for s in range(steps):
        together = sorted(sum((shard[s] for shard in shards), []))
        assert together == sorted(trimmed[s * batch * world:(s + 1) * batch * world])


@pytest.mark.parametrize("n,batch,world", [(23, 5, 1), (23, 4, 2), (10, 16, 3), (7, 2, 7)])
def test_eval_batches_cover_every_example_once_in_order(n, batch, world):
    data = indexed_data(n)
    seen = []
    for r in range(world):
        for b in ids(data.eval_batches(batch, rank=r, world_size=world)):
            assert 0 < len(b) <= batch
            seen += b
    assert seen == list(range(n))
