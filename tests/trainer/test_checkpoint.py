"""Checkpoints: only COMPLETE ones count, retention keeps latest N + best; progress is rate limited."""

from __future__ import annotations

import json

from lora_trainer.io.progress import FIELDS, ProgressWriter, write_termination_message
from lora_trainer.io.storage import LocalStore
from lora_trainer.model import checkpoint as ckpt


def _local_ckpt(tmp_path, step):
    d = tmp_path / f"local-{step}"
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "adapter_model.safetensors").write_bytes(b"w" * step)
    (d / "state.json").write_text(json.dumps({"step": step}))
    return d


class Recording(LocalStore):
    def __init__(self, root):
        super().__init__(root)
        self.puts = []

    def put_file(self, key, src):
        self.puts.append(key)
        super().put_file(key, src)

    def put_bytes(self, key, data):
        self.puts.append(key)
        super().put_bytes(key, data)


def test_marker_is_written_last_and_lists_file_digests(tmp_path):
    store = Recording(tmp_path / "s")
    key = ckpt.upload(store, _local_ckpt(tmp_path, 3), "out/job", 3)
    assert key == "out/job/checkpoints/step-3"
    assert store.puts[-1] == "out/job/checkpoints/step-3/COMPLETE"
    manifest = json.loads(store.get_bytes(store.puts[-1]))
    assert set(manifest["files"]) == {"adapter/adapter_model.safetensors", "state.json"}


def test_checkpoints_without_marker_are_ignored(tmp_path):
    store = LocalStore(tmp_path / "s")
    ckpt.upload(store, _local_ckpt(tmp_path, 2), "o", 2)
    ckpt.upload(store, _local_ckpt(tmp_path, 4), "o", 4)
    store.delete_prefix("o/checkpoints/step-4/COMPLETE")  # as if killed before the marker
    assert [(c.step, c.complete) for c in ckpt.list_checkpoints(store, "o")] == [(2, True), (4, False)]
    assert ckpt.latest_complete(store, "o").step == 2
    assert ckpt.latest_complete(LocalStore(tmp_path / "empty"), "o") is None


def test_rewriting_a_partial_step_replaces_its_leftovers(tmp_path):
    store = LocalStore(tmp_path / "s")
    store.put_bytes("o/checkpoints/step-4/stale.bin", b"x")
    ckpt.upload(store, _local_ckpt(tmp_path, 4), "o", 4)
    assert not store.exists("o/checkpoints/step-4/stale.bin")


def test_retention_keeps_latest_n_and_best_and_drops_stale_partials(tmp_path):
    store = LocalStore(tmp_path / "s")
    for step in (2, 4, 6, 8, 10):
        ckpt.upload(store, _local_ckpt(tmp_path, step), "o", step)
    store.put_bytes("o/checkpoints/step-5/partial", b"x")
    deleted = ckpt.prune(store, "o", keep=2, best_step=4)
    assert sorted(deleted) == [2, 5, 6]
    assert [c.step for c in ckpt.list_checkpoints(store, "o")] == [4, 8, 10]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_writes_on_state_change_and_at_most_once_per_interval(tmp_path):
    store, clock = LocalStore(tmp_path), Clock()
    p = ProgressWriter(store, "o/progress.json", interval_s=10, clock=clock)
    assert p.update(state="Preparing")  # the first write is always due
    for step in range(1, 50):
        clock.t += 0.5
        p.update(step=step, loss=1.0 / step)
    assert p.writes == 3  # t=0, 10, 20 (t ends at 24.5)
    assert p.update(state="Training")  # state change: immediately
    assert not p.update(step=50)
    assert p.update(step=51, force=True)
    data = json.loads(store.get_bytes("o/progress.json"))
    assert set(data) == set(FIELDS) and data["state"] == "Training" and data["step"] == 51


def test_termination_message_is_one_json_line_and_unwritable_paths_are_ignored(tmp_path):
    write_termination_message(tmp_path / "t", {"state": "Failed", "error": "x" * 5000, "step": 3})
    text = (tmp_path / "t").read_text()
    assert text.count("\n") == 1 and len(text) < 4096 and json.loads(text)["state"] == "Failed"
    write_termination_message(tmp_path / "missing" / "dir" / "t", {"state": "Failed"})


def test_every_rank_restores_its_own_rng_state_and_a_missing_one_says_so(tmp_path):
    import random

    import torch

    states = {}
    for rank in (1, 2):  # rank 0's rng.pt is restored by load_local with the rest
        torch.manual_seed(rank)
        random.seed(rank)
        states[rank] = ckpt.rng_state()
        torch.save(states[rank], tmp_path / ckpt.rng_file(rank))
    draws = {}
    for rank in (1, 2):
        torch.manual_seed(99)
        assert ckpt.restore_rng(tmp_path, rank)
        draws[rank] = (torch.rand(3).tolist(), random.random())
    torch.manual_seed(2)
    random.seed(2)
    assert draws[2] == (torch.rand(3).tolist(), random.random()), "rank 2 got someone else's stream"
    assert draws[1] != draws[2]
    assert ckpt.rng_file(0) == "rng.pt", "rank 0 keeps the single-process file name"
    assert ckpt.restore_rng(tmp_path, 3) is False, "a checkpoint of three ranks has no state for rank 3"
