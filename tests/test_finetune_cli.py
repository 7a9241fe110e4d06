"""--pretrained through the CLI: an official-layout checkpoint seeds a CIFAR run at a larger input size."""
import torch

import train_mamba_baseline
from models.vim import build_model
from tests.conftest import make_cifar


def official_checkpoint(path, embed_dim=32, depth=2, patch=16, img=64, classes=1000):
    torch.manual_seed(1)
    m = build_model("mamba_tiny", classes, embed_dim=embed_dim, depth=depth, patch_size=patch, img_size=img)
    torch.save({"model": m.state_dict(), "optimizer": {}, "epoch": 299}, path)
    return m.state_dict()


def args(tmp_path, data, *extra):
    return ["--arch", "mamba_tiny", "--device", "cpu", "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "8",
            "--no_progress", "--data_dir", data, "--save_dir", str(tmp_path / "c"), "--log_dir", str(tmp_path / "l"),
            "--run_id", "ft", "--lr", "1e-30", "--no_use_randaugment", *extra]


def test_finetune_loads_weights_resizes_inputs_and_records_the_shape(tmp_path):
    data = make_cifar(str(tmp_path / "d"), n_train=16, n_test=8)
    sd = official_checkpoint(tmp_path / "vim.pth")
    assert train_mamba_baseline.main(args(tmp_path, data, "--pretrained", str(tmp_path / "vim.pth"),
                                          "--input_size", "48")) == 0
    log = (tmp_path / "l" / "mamba_tiny_cifar10_baseline_ft.log").read_text()
    assert "pos_embed resized 4x4 -> 3x3" in log and "input 48x48" in log and "10 tokens (patch 16)" in log
    ck = torch.load(tmp_path / "c" / "mamba_tiny_cifar10_last.pth", weights_only=True)
    assert (ck["config"]["embed_dim"], ck["config"]["depth"], ck["config"]["patch_size"],
            ck["config"]["input_size"]) == (32, 2, 16, 48)
    # lr 1e-30: the trained weights are still the checkpoint's, except the new 10-class head.
    for k, v in sd.items():
        if not k.startswith(("head.", "pos_embed")):
            torch.testing.assert_close(ck["model"][k], v, rtol=0, atol=1e-6, msg=k)
    assert ck["model"]["head.weight"].shape == (10, 32) and ck["model"]["pos_embed"].shape == (1, 10, 32)


def test_finetune_refuses_shape_flags_and_a_wrong_variant(tmp_path, capsys):
    data = make_cifar(str(tmp_path / "d"), n_train=16, n_test=8)
    official_checkpoint(tmp_path / "vim.pth")
    assert train_mamba_baseline.main(args(tmp_path, data, "--pretrained", str(tmp_path / "vim.pth"),
                                          "--embed_dim", "64")) == 2
    assert "come from the --pretrained checkpoint" in capsys.readouterr().err
    official_checkpoint(tmp_path / "tiny.pth", embed_dim=192, depth=24)  # shaped like Vim-tiny
    a = args(tmp_path, data, "--pretrained", str(tmp_path / "tiny.pth"))
    a[a.index("mamba_tiny")] = "mamba_small"
    assert train_mamba_baseline.main(a) == 2
    assert "pass --arch mamba_tiny" in capsys.readouterr().err
    # the official weights have Vim's patch embedding: asking for the conv stem is refused, naming both
    assert train_mamba_baseline.main(args(tmp_path, data, "--pretrained", str(tmp_path / "vim.pth"),
                                          "--stem", "conv")) == 2
    err = capsys.readouterr().err
    assert "holds a patch embedding, not the --stem conv asked for" in err and err.count("\n") == 1


def test_finetune_rejects_a_broken_file_in_one_line(tmp_path, capsys):
    data = make_cifar(str(tmp_path / "d"), n_train=16, n_test=8)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    assert train_mamba_baseline.main(args(tmp_path, data, "--pretrained", str(tmp_path / "bad.pth"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_mamba_baseline.py: error:")
