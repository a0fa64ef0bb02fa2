"""The run folder is never overwritten: foreign folders, existing runs, changed configs."""

import argparse
import json

import numpy as np
import pytest

from jaxdiff.training import TrainConfig, train
from jaxdiff.training.cli import add_train_parser, run_train


def _config(tmp_path, **kw):
    np.savez(tmp_path / "d.npz", train=np.zeros((4, 8, 8, 3), np.uint8))
    return TrainConfig(
        data=str(tmp_path / "d.npz"), out=str(tmp_path / "out"), resolution=8, batch=4, **kw
    )


def test_refuses_foreign_folder(tmp_path):
    config = _config(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    for resume in (False, True):
        config.resume = resume
        with pytest.raises(FileExistsError, match="not a jaxdiff training run"):
            train(config)
    assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"


def test_refuses_existing_run_without_resume_and_changed_config(tmp_path):
    config = _config(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run.json").write_text(
        json.dumps({"data": config.data, "resolution": 8, "batch": 4})
    )
    with pytest.raises(FileExistsError, match="already holds a training run; pass --resume"):
        train(config)
    config.resume = True
    with pytest.raises(
        ValueError, match="cannot resume .* with a different config .*lr: None -> 0.0002"
    ):
        train(config)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        train(_config(tmp_path, prediction_type="noise"))
    with pytest.raises(ValueError, match="model must be one of"):
        train(_config(tmp_path, model="huge"))


def test_cli_reports_errors(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="jaxdiff")
    add_train_parser(parser.add_subparsers(dest="command"))
    (tmp_path / "empty").mkdir()
    args = parser.parse_args(
        ["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]
    )
    assert run_train(args) == 2
    assert "holds no images" in capsys.readouterr().err


def test_snr_gamma_is_part_of_the_run(tmp_path):
    from jaxdiff.training.cli import config_from_args
    from jaxdiff.training.loop import _check_out_dir

    parser = argparse.ArgumentParser(prog="jaxdiff")
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--data", "d", "--out", "o", "--snr-gamma", "5"])
    assert config_from_args(args).snr_gamma == 5.0
    # a run written before snr_gamma existed resumes unweighted, and refuses a weighted resume
    config = _config(tmp_path, resume=True)
    old = {k: v for k, v in config.run_fields().items() if k != "snr_gamma"}
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run.json").write_text(json.dumps(old))
    assert _check_out_dir(config) is True
    config.snr_gamma = 5.0
    with pytest.raises(ValueError, match="different config .*snr_gamma: None -> 5.0"):
        _check_out_dir(config)
