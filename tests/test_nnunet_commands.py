"""The environment the package gives the nnU-Net commands it starts."""
import os

from nnunet_tpp.nnunet_commands import NNUNetFolders


def test_nnunet_pools_default_to_the_machine_and_the_users_setting_wins(tmp_path, monkeypatch):
    folders = NNUNetFolders(tmp_path)
    monkeypatch.delenv("nnUNet_def_n_proc", raising=False)
    monkeypatch.delenv("nnUNet_n_proc_DA", raising=False)
    env = folders.env(EXTRA="1")
    assert env["nnUNet_def_n_proc"] == str(min(8, os.cpu_count() or 1))
    assert env["nnUNet_n_proc_DA"] == "1" and env["EXTRA"] == "1"
    assert env["nnUNet_raw"] == str(folders.raw)
    monkeypatch.setenv("nnUNet_def_n_proc", "12")
    monkeypatch.setenv("nnUNet_n_proc_DA", "4")
    assert (folders.env()["nnUNet_def_n_proc"], folders.env()["nnUNet_n_proc_DA"]) == ("12", "4")
