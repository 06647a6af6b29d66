"""Seeds in the lab: the distill section trains its teacher and students once per seed and reports mean and spread;
readings (distill and quality) call a difference only beyond the spread; the presets set their seeds."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from seqlab.analysis.stats import seed_interval, spread
from seqlab.errors import InputError
from seqlab.lab import LabConfig, load_preset
from seqlab.lab.report import lab_document
from seqlab.lab.runner import run_lab
from seqlab.lab.sections import distill
from seqlab.lab.sections.quality import reading

TINY_TRAIN = {"steps": 2, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "eval_batches": 1}
DISTILL = {"task": {"name": "corpus", "seq_len": 16, "eval": {"split": "validation"}},
           "teacher": {"mixer": "attention", "d_model": 8, "n_layers": 1, "attention": {"n_heads": 2}},
           "teacher_train": TINY_TRAIN, "students": ["gla"], "train": TINY_TRAIN, "context": 16, "seeds": 2}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds") / "run"
    cfg = LabConfig.from_dict({"name": "seeds", "seed": 3, "threads": 1, "sections": ["distill"], "distill": DISTILL})
    run_lab(cfg, out, progress=False)
    return out


def test_distill_trains_every_model_per_seed_and_reports_mean_and_spread(seeded):
    cells = {c["cell"]: c for c in json.loads((seeded / "results.json").read_text())["sections"]["distill"]["cells"]}
    teacher, student = cells["teacher"], cells["student-gla"]
    assert "error" not in teacher and "error" not in student, (teacher.get("traceback"), student.get("traceback"))
    assert teacher["seeds"] == student["seeds"] == [3, 4]
    folder = seeded / "cells" / "distill" / "teacher"
    assert (folder / "checkpoint" / "model.safetensors").is_file()
    assert (folder / "checkpoint-seed4" / "model.safetensors").is_file()  # the second seed's teacher
    a, b = (t["bits_per_byte"] for t in teacher["test_seeds"])
    assert a != b and teacher["test"]["bits_per_byte"] == pytest.approx((a + b) / 2)
    assert teacher["test_spread"]["bits_per_byte"]["n"] == 2 and len(teacher["learned_seeds"]) == 2
    for role in ("teacher", "distilled", "scratch"):
        row = student[role]
        values = [e["bits_per_byte"] for e in row["eval_seeds"]]
        assert len(values) == 2 and row["eval"]["bits_per_byte"] == pytest.approx(sum(values) / 2)
        assert row["eval_spread"]["bits_per_byte"] == spread(values)
        assert row["interval"] == seed_interval(spread(values))
        assert row["retained_spread"]["n"] == 2
    assert student["teacher"]["retained"] == 1.0 and student["teacher"]["retained_spread"]["std"] == 0.0
    assert student["headline"]["vs_teacher"] in ("better", "worse", "tied")
    assert student["gain"]["state_bytes_ratio"] > 0  # decode costs: measured once, on the first seed's models
    assert (seeded / "cells" / "distill" / "student-gla" / "student" / "model.safetensors").is_file()


def test_the_seeded_report_prints_only_results_json_fields(seeded, tmp_path):
    results = json.loads((seeded / "results.json").read_text())
    doc = lab_document(results, tmp_path)
    for sec in doc.sections:
        for source in sec.sources:
            assert source.expected(results) == source.text, source
        printed = Counter(n for s in sec.sources for n in re.findall(r"\d+\.\d+|\d+", s.text))
        shown = Counter(n for t in sec.texts() for n in re.findall(r"\d+\.\d+|\d+", t))
        assert not shown - printed, (sec.title, shown - printed)
    md = (seeded / "report.md").read_text()
    assert "seeds 3, 4" in md and "two standard deviations" in md and "kept: std" in md


def student(vs_teacher: str, vs_scratch: str, interval=(2.9, 3.1)) -> dict:
    row = {"eval": {"bits_per_byte": 3.0}, "retained": 0.9, "retained_spread": {"std": 0.02},
           "interval": list(interval)}
    return {"student": "gla", "metric": "bits_per_byte", "seeds": [0, 1, 2],
            "headline": {"vs_teacher": vs_teacher, "vs_scratch": vs_scratch},
            "teacher": {**row, "eval": {"bits_per_byte": 2.7}}, "distilled": row,
            "scratch": {**row, "eval": {"bits_per_byte": 3.2}}}


def test_distill_readings_call_a_difference_only_beyond_the_spread():
    row = {"eval": {"bits_per_byte": 3.0}, "interval": [2.9, 3.1]}
    assert distill.verdict(row, {"eval": {"bits_per_byte": 3.05}, "interval": [2.95, 3.15]}, "bits_per_byte") == "tied"
    assert distill.verdict(row, {"eval": {"bits_per_byte": 3.5}, "interval": [3.3, 3.7]}, "bits_per_byte") == "better"
    assert distill.verdict(row, {"eval": {"bits_per_byte": 2.5}, "interval": [2.3, 2.7]}, "bits_per_byte") == "worse"
    assert distill.verdict({**row, "interval": None}, row, "bits_per_byte") == "untested"
    tied = distill.student_reading(student("tied", "tied"))
    assert "within the noise of the teacher" in tied and "keeps" not in tied and "beats" not in tied
    assert "within the noise of its from-scratch twin" in tied
    clear = distill.student_reading(student("worse", "better"))
    assert "keeps 0.900 (std 0.020) of the teacher's quality, below it beyond the noise" in clear
    assert "beats its from-scratch twin (3.200) beyond the noise" in clear
    one = distill.student_reading(student("untested", "untested"))
    assert "no difference is called" in one and "keeps" not in one and "beats" not in one
    unlearned = {"learned": False, "test": {"bits_per_byte": 4.6}, "order0_bits_per_token": 4.7}
    text = distill.readings(unlearned, [student("worse", "better")])
    assert "has not learned its task" in text and "keeps" not in text


def test_a_quality_leader_must_clear_the_seed_spread_as_well_as_the_wilson_interval():
    def cell(mixer, acc, values):  # Wilson intervals over many pooled queries are narrow; the seeds disagree
        return {"mixer": mixer, "test": {"accuracy": acc}, "interval": [acc - 0.01, acc + 0.01], "learned": True,
                "test_spread": {"accuracy": spread(values)}}
    noisy = [cell("lstm", 0.62, [0.40, 0.62, 0.84]), cell("gru", 0.55, [0.50, 0.55, 0.60])]
    assert "No leader" in reading(noisy, "accuracy", "accuracy", True)
    steady = [cell("lstm", 0.62, [0.61, 0.62, 0.63]), cell("gru", 0.55, [0.54, 0.55, 0.56])]
    assert reading(steady, "accuracy", "accuracy", True).startswith("lstm leads")



def test_a_tie_on_bits_per_byte_names_the_lowest_not_the_highest():
    def cell(mixer, values):
        return {"mixer": mixer, "test": {"bits_per_byte": spread(values)["mean"]}, "learned": True,
                "test_spread": {"bits_per_byte": spread(values)}}
    text = reading([cell("gru", [3.7, 3.8, 3.9]), cell("lstm", [3.75, 3.85, 3.95])], "bits_per_byte", "bits per byte",
                   False)
    assert text.startswith("No leader: gru, lstm") and "lowest gru at 3.800" in text and "highest" not in text


def test_presets_set_their_seeds_and_bad_seeds_are_one_error():
    standard, quick = load_preset("standard"), load_preset("quick")
    assert standard.quality.seeds == 3 and standard.distill.seeds == 3
    assert quick.quality.seeds >= 2 and quick.distill.seeds == quick.quality.seeds
    assert load_preset("full").distill.seeds >= 1
    with pytest.raises(InputError, match="distill.seeds"):
        distill.Config(seeds=0)
