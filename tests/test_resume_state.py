"""The one resume-state helper (dltest.resume) and the state files train, retrain and robust-al
write with it: atomic saves, settings refused by name, digests, and the formats of dltest before
issue 19 still resumed (fixtures written by that code)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from dltest.data import load_dataset
from dltest.errors import DltestError
from dltest.resume import ResumeState, Wording, differences, digest, discard, partial_path

FIXTURES = Path(__file__).with_name("fixtures")
SETTINGS = {"lr": 0.1, "epochs": 2, "adversarial": {"method": "pgd", "eps": 0.3}, "train_data": "abc"}


def state_file(path, settings=SETTINGS, **kwargs) -> ResumeState:
    return ResumeState(path, "dltest test state", 1, settings, **kwargs)


def test_a_state_round_trips_with_tensors_and_plain_values(tmp_path):
    file = state_file(tmp_path / "s.pt")
    assert not file.exists() and file.load() is None
    state = {"w": torch.arange(6.0).reshape(2, 3), "epoch": 3, "history": [{"loss": 0.5}], "best": None,
             "betas": (0.9, 0.999), "groups": {0: torch.tensor([1, 2])}}
    file.save(state)
    loaded = state_file(tmp_path / "s.pt").load()
    assert set(loaded) == set(state) and loaded["epoch"] == 3 and loaded["history"] == [{"loss": 0.5}]
    assert loaded["w"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]] and loaded["groups"][0].tolist() == [1, 2]
    raw = torch.load(tmp_path / "s.pt", weights_only=True)  # on disk: the job's keys beside the envelope
    assert raw["format"] == "dltest test state 1" and raw["settings"] == SETTINGS
    assert raw["digest"].startswith("sha256:") and raw["epoch"] == 3


def test_a_crash_mid_write_leaves_the_old_state_and_no_temporary_file(tmp_path, monkeypatch):
    file = state_file(tmp_path / "s.pt")
    file.save({"epoch": 1, "w": torch.ones(3)})
    real_save = torch.save

    def dies_half_way(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:50])  # half a file on disk...
        raise KeyboardInterrupt  # ...then Ctrl-C before the rename

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        file.save({"epoch": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert file.load()["epoch"] == 1 and file.load()["w"].tolist() == [1.0, 1.0, 1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pt"]


def test_other_settings_are_refused_naming_what_differs(tmp_path):
    state_file(tmp_path / "s.pt").save({"epoch": 0})
    other = {**SETTINGS, "lr": 0.2, "adversarial": {"method": "pgd", "eps": 0.1}}
    with pytest.raises(DltestError) as caught:
        state_file(tmp_path / "s.pt", other).load()
    assert str(caught.value) == (f"cannot resume from {tmp_path / 's.pt'}: it was written by a run with other "
                                 "settings or data (adversarial.eps, lr); remove it to start over")
    fewer = {k: v for k, v in SETTINGS.items() if k != "epochs"}
    with pytest.raises(DltestError, match=r"other settings or data \(epochs\)"):
        state_file(tmp_path / "s.pt", fewer).load()
    with pytest.raises(DltestError, match=r"other settings or data \(epochs, seed\)"):
        state_file(tmp_path / "s.pt", {**fewer, "seed": 1}).load()


def test_differences_name_nested_and_missing_settings():
    assert differences({"a": 1, "b": {"c": 2, "d": 3}}, {"a": 1, "b": {"c": 2, "d": 4}}) == ["b.d"]
    assert differences({"a": 1}, {"a": 1, "b": 2}) == ["b"]
    assert differences({"a": [1, 2]}, {"a": [1, 3]}) == ["a"]
    assert differences({"a": 1}, {"a": 1}) == []
    assert differences(None, {"a": 1}) == ["settings"]


def test_an_edited_truncated_or_foreign_file_is_refused(tmp_path):
    path = tmp_path / "s.pt"
    state_file(path).save({"epoch": 4, "w": torch.ones(2)})
    raw = torch.load(path, weights_only=True)
    raw["w"][0] = 7.0  # edited by hand, digest kept
    torch.save(raw, path)
    with pytest.raises(DltestError, match=r"its contents do not match their digest \(edited or damaged\)"):
        state_file(path).load()
    path.write_bytes(b"")
    with pytest.raises(DltestError, match="it is empty, truncated or not a dltest partial"):
        state_file(path).load()
    torch.save({"format": "something else", "epoch": 1}, path)
    with pytest.raises(DltestError, match="it is not a dltest test state 1 file"):
        state_file(path).load()
    torch.save([1, 2], path)
    with pytest.raises(DltestError, match=r"not a dltest partial \(it holds a list, not a dict\)"):
        state_file(path).load()
    path.unlink()
    path.mkdir()
    with pytest.raises(DltestError, match="not a regular file"):
        state_file(path).load()


def test_wording_and_reserved_keys(tmp_path):
    wording = Wording(unreadable="not a state file", other_settings="another run", remedy="remove the folder")
    path = tmp_path / "s.pt"
    path.write_bytes(b"junk")
    with pytest.raises(DltestError, match=r"^cannot resume from .*: not a state file \(.*\); remove the folder$"):
        state_file(path, wording=wording).load()
    with pytest.raises(ValueError, match="reserved"):
        state_file(path).save({"settings": 1})


def test_a_finished_job_removes_its_state(tmp_path):
    assert partial_path(tmp_path / "m.pt") == tmp_path / "m.pt.partial"
    file = state_file(partial_path(tmp_path / "m.pt"))
    file.save({"epoch": 0})
    file.remove()
    assert not file.exists()
    discard(file.path)  # nothing there: nothing to do


def test_the_digest_sees_every_value_and_its_type():
    base = {"a": torch.tensor([1.0, 2.0]), "b": [1, (2, 3)], "c": {"x": None}}
    assert digest(base) == digest({"c": {"x": None}, "b": [1, (2, 3)], "a": torch.tensor([1.0, 2.0])})
    for changed in ({**base, "a": torch.tensor([1.0, 2.5])}, {**base, "a": torch.tensor([1, 2])},
                    {**base, "b": [1, [2, 3]]}, {**base, "c": {"x": 0}}, {**base, "d": 1}):
        assert digest(changed) != digest(base)


# --- train: the partial of ``dltest train`` / ``retrain`` ----------------------------------------


def tiny_training():
    from dltest.training import TrainConfig

    data = load_dataset("mnist", "train").subset(torch.arange(64))
    torch.manual_seed(0)
    model = nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(49, 10))
    return model, data, TrainConfig(epochs=2, batch_size=32, seed=0)


def test_train_resumes_a_partial_written_before_issue_19(tmp_path):
    """tests/fixtures/train_partial_1: epoch 0 of 2, written by main's code (no format, settings
    under "config", no digest). Resuming it runs epoch 1 only and ends where an uninterrupted run does."""
    from dltest.training import train

    old = torch.load(FIXTURES / "train_partial_1" / "m.pt.partial", weights_only=True)
    assert "format" not in old and old["epoch"] == 0
    partial = tmp_path / "m.pt.partial"
    shutil.copy(FIXTURES / "train_partial_1" / "m.pt.partial", partial)
    model, data, config = tiny_training()
    resumed = train(model, data, None, config, state_path=partial, resume=True, progress=False)
    assert [h["epoch"] for h in resumed.history] == [0, 1]
    assert resumed.history[0] == old["history"][0]  # epoch 0 was not run again
    assert torch.load(partial, weights_only=True)["format"] == "dltest train partial 2"

    model, data, config = tiny_training()
    whole = train(model, data, None, config, progress=False)
    assert [h["epoch"] for h in whole.history] == [0, 1]
    for a, b in zip(resumed.model.state_dict().values(), whole.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)


def test_train_refuses_a_partial_of_other_settings_naming_them(tmp_path):
    from dltest.training import TrainConfig, train

    partial = tmp_path / "m.pt.partial"
    model, data, config = tiny_training()
    train(model, data, None, TrainConfig(epochs=1, batch_size=32, seed=0), state_path=partial, progress=False)
    model, data, config = tiny_training()
    with pytest.raises(DltestError, match=r"other settings or data \(epochs\); remove it to start over$"):
        train(model, data, None, config, state_path=partial, resume=True, progress=False)
    with pytest.raises(DltestError, match=r"other settings or data \(train_data\)"):
        train(model, data.subset(torch.arange(32)), None, TrainConfig(epochs=1, batch_size=32, seed=0),
              state_path=partial, resume=True, progress=False)
    shutil.copy(FIXTURES / "train_partial_1" / "m.pt.partial", partial)  # the old format names them too
    with pytest.raises(DltestError, match=r"other settings or data \(lr\)"):
        train(model, data, None, TrainConfig(epochs=2, batch_size=32, seed=0, lr=0.01), state_path=partial,
              resume=True, progress=False)


# --- robust-al: a run folder written before issue 19 -------------------------------------------


def fixture_run():
    """The data, settings and model of tests/fixtures/robust_al_state_1/make_fixture.py."""
    from dltest.workflows.robust_al import RobustALConfig

    train = load_dataset("mnist", "train").subset(torch.arange(200))
    val = load_dataset("mnist", "val").subset(torch.arange(50))
    holdout = load_dataset("mnist", "holdout").subset(torch.arange(50))
    config = RobustALConfig(dataset="mnist", metrics=("entropy", "random"), budget=70, initial=40, per_stage=10,
                            epochs=2, initial_epochs=3, at=None, eval_attacks=("fgsm",), eval_n=20, val_n=20,
                            check_steps=1, seed=0, final_attacks=("fgsm",))
    return config, dict(train_data=train, val_data=val, holdout=holdout, device="cpu",
                        model_factory=lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 10)))


def copy_fixture_run(to: Path) -> Path:
    shutil.copytree(FIXTURES / "robust_al_state_1", to,
                    ignore=shutil.ignore_patterns("make_fixture.py", "uninterrupted_*"))
    return to


def positions(records) -> list[tuple]:
    return [(r.metric, r.stage, r.labeled, r.selected) for r in records]


def state_format(path: Path) -> str:
    return torch.load(path, weights_only=True)["format"]


@pytest.mark.slow
def test_robust_al_resumes_a_run_folder_written_before_issue_19(tmp_path, monkeypatch):
    """State format 1 (main's code): entropy finished, its final attack kept in entropy.final.json;
    random cut after stage 1. Resumed, the run selects the positions of the uninterrupted run (main's
    log, and this code's own run) and reuses entropy's final attack instead of attacking again."""
    import dltest.workflows.robust_al as ral

    attacked = []
    real = ral.evaluate_robustness

    def counting(model, data, attacks, **kwargs):
        attacked.append([a.name for a in attacks])
        return real(model, data, attacks, **kwargs)

    monkeypatch.setattr(ral, "evaluate_robustness", counting)
    config, kwargs = fixture_run()
    folder = copy_fixture_run(tmp_path / "run")
    assert {state_format(p) for p in (folder / "state").glob("*.pt")} == {"dltest robust-al state 1"}
    result = ral.robust_active_learning(config, run_dir=folder, resume=True, **kwargs)
    assert len(attacked) == 3  # random's stages 2 and 3 and its final attack; entropy's final one was kept
    kept = json.loads((FIXTURES / "robust_al_state_1" / "state" / "entropy.final.json").read_text())
    assert result.final_attacks["entropy"] == kept["robust_accuracy"]
    expected = positions(ral.read_log(FIXTURES / "robust_al_state_1" / "uninterrupted_log.jsonl"))
    assert positions(ral.read_log(folder)) == expected
    assert [len(r.selected) for r in result.records["random"]] == [0, 10, 10, 10]
    assert state_format(folder / "state" / "random.pt") == "dltest robust-al state 2"
    assert state_format(folder / "state" / "entropy.pt") == "dltest robust-al state 1"  # finished: not rewritten

    attacked.clear()
    again = ral.robust_active_learning(config, run_dir=folder, resume=True, **kwargs)  # finished, mixed formats
    assert attacked == [] and again.final_attacks == result.final_attacks
    assert positions(r for rs in again.records.values() for r in rs) == expected
    ral.robust_active_learning(config, run_dir=tmp_path / "whole", **kwargs)
    assert positions(ral.read_log(tmp_path / "whole")) == expected


def test_robust_al_state_files_hold_the_labeled_pool(tmp_path):
    from dltest.data import LabeledPool
    from dltest.workflows.robust_al import robust_active_learning

    config, kwargs = fixture_run()
    result = robust_active_learning(config, run_dir=tmp_path / "run", **kwargs)
    saved = torch.load(tmp_path / "run" / "state" / "random.pt", weights_only=True)
    pool = LabeledPool.from_state_dict({k: saved[k] for k in ("size", "labeled", "labels")})
    chosen = [i for r in result.records["random"] for i in r.selected]  # the pool is positions 0..199
    initial = set(pool.labeled().tolist()) - set(chosen)
    assert pool.size == 200 and len(pool) == 70 and len(initial) == 40
    assert pool.labels().tolist() == kwargs["train_data"].y[pool.labeled()].tolist()
    assert saved["settings"] == json.loads(json.dumps(config.to_dict()))


def test_robust_al_refuses_an_edited_format_1_state(tmp_path):
    from dltest.workflows.robust_al import robust_active_learning

    config, kwargs = fixture_run()
    folder = copy_fixture_run(tmp_path / "run")
    path = folder / "state" / "random.pt"
    raw = torch.load(path, weights_only=True)
    raw["labeled"][0] = 199
    torch.save(raw, path)
    with pytest.raises(DltestError, match=r"random.pt: its contents do not match their digest \(edited or damaged\); "
                                          "remove the run folder to start afresh"):
        robust_active_learning(config, run_dir=folder, resume=True, **kwargs)
    with pytest.raises(DltestError, match="initial.pt: it comes from another run or other settings;"):
        _resume_with_changed_config_file(tmp_path / "run2", config, kwargs)


def _resume_with_changed_config_file(folder: Path, config, kwargs) -> None:
    """A run folder whose config.json says budget 80 (as if edited) while its state says 70."""
    from dataclasses import replace

    from dltest.workflows.robust_al import robust_active_learning

    copy_fixture_run(folder)
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**saved, "budget": 80}))
    robust_active_learning(replace(config, budget=80), run_dir=folder, resume=True, **kwargs)
