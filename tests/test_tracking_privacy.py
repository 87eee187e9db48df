"""Paths never reach MLflow: path-valued params and tags are replaced by a digest, everything else is kept."""

from __future__ import annotations

import mlflow

from pipeline import tracking


def test_paths_in_params_and_tags_become_digests(tmp_path):
    uri = tracking.connect(f"sqlite:///{tmp_path / 'm.db'}")
    secret_folder = "/data/DOE_JOHN_1961/ct"
    run_id = tracking.start_run(uri, "t", "r", tags={"anatdiff.data": secret_folder, "anatdiff.job": "pretrain"},
                                resume_tag=("anatdiff.run_key", f"{secret_folder}/runs/x"))
    tracking.log_params(uri, run_id, {"data": secret_folder, "storage_path": "s3://bucket/DOE_JOHN/runs",
                                      "model": {"guide_checkpoint": "runs:/abc123", "channels": [8, 16]},
                                      "probe": {"data": "relative/DOE_JOHN"}, "run_name": "demo-1",
                                      "registered_model": "anatdiff-backbone"})
    tracking.set_tags(uri, run_id, {"anatdiff.checkpoint": f"{secret_folder}/ckpt", "anatdiff.registered_model":
                                    "anatdiff-backbone/3"})
    run = mlflow.MlflowClient(uri).get_run(run_id)
    everything = str(run.data.params) + str(run.data.tags)
    assert "DOE" not in everything and "/data/" not in everything
    p, t = run.data.params, run.data.tags
    assert p["data"] == tracking.public_value(secret_folder) and p["data"].startswith("path-")
    assert p["model.guide_checkpoint"] == "runs:/abc123" and p["model.channels"] == "[8, 16]"
    assert p["run_name"] == "demo-1" and p["registered_model"] == "anatdiff-backbone"
    assert t["anatdiff.job"] == "pretrain" and t["anatdiff.registered_model"] == "anatdiff-backbone/3"
    # the resume lookup hashes the same way, so a rerun finds its unfinished run
    again = tracking.start_run(uri, "t", "r", resume_tag=("anatdiff.run_key", f"{secret_folder}/runs/x"))
    assert again == run_id
