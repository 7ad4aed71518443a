"""Short-context retention: lm-eval's own benchmark tasks on local files and from the datasets
cache, and the offline ``opsdl_short_cs`` task (evals/retention)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lm_eval_cli import run_lm_eval

from evals.retention.benchmarks import BENCHMARKS, RetentionDataError, builtin_yaml, lm_eval_tasks_dir, mmlu_subjects
from evals.retention.write_tasks import GROUP, task_name, write_retention_tasks

ROOT = Path(__file__).resolve().parents[1]

# ~4 rows per benchmark in the hub data sets' own column formats.
ARC = [
    {"id": "Mercury_7175875", "question": "An astronomer observes that a planet rotates faster after a meteorite "
     "impact. Which is the most likely effect of this increase in rotation?",
     "choices": {"text": ["Planetary density will decrease.", "Planetary years will become longer.",
                          "Planetary days will become shorter.", "Planetary gravity will become stronger."],
                 "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
    {"id": "Mercury_SC_409171", "question": "Which will most likely result from testing different building designs?",
     "choices": {"text": ["buildings will be built faster", "buildings will be made safer",
                          "building designs will look nicer", "building materials will be cheaper"],
                 "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
    {"id": "Mercury_SC_408547", "question": "Which step signals the beginning of photosynthesis?",
     "choices": {"text": ["Chemical energy is absorbed through the roots.",
                          "Light energy is converted to chemical energy.",
                          "Chlorophyll in the leaf captures light energy.", "Sunlight is converted into chlorophyll."],
                 "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
    {"id": "MCAS_2004_9_6", "question": "Which of the following is an example of a physical change?",
     "choices": {"text": ["rusting iron", "melting ice", "burning wood"], "label": ["1", "2", "3"]}, "answerKey": "2"},
]
HELLASWAG = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "endings": ["is using wrap to wrap a pair of skis.",
     "is ripping level tiles off.", "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "indomain", "label": "3"},
    {"ind": 92, "activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell. She bends down and grabs "
     "the pole.", "ctx_b": "the lady", "ctx": "A lady walks to a barbell. She bends down and grabs the pole. the lady",
     "endings": ["swings and lands in her arms.", "pulls the barbell forward.", "pulls a rope attached to the barbell.",
                 "stands and lifts the weight over her head."], "source_id": "activitynet~v_-lJS58hyo1c",
     "split": "val", "split_type": "zeroshot", "label": "3"},
    {"ind": 106, "activity_label": "Home and Garden", "ctx_a": "[header] How to grow tomatoes [title] Pick a sunny "
     "spot.", "ctx_b": "[step] Tomatoes", "ctx": "[header] How to grow tomatoes [title] Pick a sunny spot. [step] "
     "Tomatoes", "endings": ["need [substeps] six hours of sun.", "are blue.", "like snow.",
                             "grow in the dark [title] always."], "source_id": "wikihow~1", "split": "val", "split_type": "indomain", "label": "0"},
    {"ind": 7, "activity_label": "Ice fishing", "ctx_a": "A man is kneeling on a frozen lake.", "ctx_b": "a fish",
     "ctx": "A man is kneeling on a frozen lake. a fish", "endings": ["swims up to the bait and grabs it.",
     "is shown on the ice.", "gets caught in the frozen waters.", "is tied to a hook."], "source_id": "activitynet~v_2",
     "split": "val", "split_type": "indomain", "label": "1"},
]
WINOGRANDE = [
    {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.", "option1": "Sarah",
     "option2": "Maria", "answer": "1"},
    {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.", "option1": "Sarah",
     "option2": "Maria", "answer": "2"},
    {"sentence": "They were worried the wine would ruin the bed and the blanket, but the _ wasn't ruined.",
     "option1": "blanket", "option2": "None", "answer": "2"},
    {"sentence": "Terry tried to bake the eggplant in the toaster oven but the _ was too big.", "option1": "eggplant",
     "option2": "toaster", "answer": "1"},
]
MMLU = [  # cais/mmlu "all": sorted by subject as in the hub data set
    {"question": "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.",
     "subject": "abstract_algebra", "choices": ["0", "4", "2", "6"], "answer": 1},
    {"question": "Let p = (1, 2, 5, 4)(2, 3) in S_5 . Find the index of <p> in S_5.", "subject": "abstract_algebra",
     "choices": ["8", "2", "24", "120"], "answer": 2},
    {"question": "What is the embryological origin of the hyoid bone?", "subject": "anatomy",
     "choices": ["The first pharyngeal arch", "The first and second pharyngeal arches", "The second pharyngeal arch",
                 "The second and third pharyngeal arches"], "answer": 3},
    {"question": " Which of these branches of the trigeminal nerve contain somatic motor processes?",
     "subject": "anatomy", "choices": ["The supraorbital nerve", "The infraorbital nerve", "The mental nerve",
                                       "None of the above"], "answer": 3},
]
ROWS = {"mmlu": MMLU, "arc_challenge": ARC, "hellaswag": HELLASWAG, "winogrande": WINOGRANDE}
FILE_NAMES = {"mmlu": "mmlu_test.parquet", "arc_challenge": "arc_challenge_test.jsonl",
              "hellaswag": "hellaswag_validation.parquet", "winogrande": "winogrande_xl_validation.jsonl"}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".parquet":
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path)
    elif path.suffix == ".csv":
        import pandas as pd

        pd.DataFrame(rows).to_csv(path, index=False)
    return path


def write_fixtures(folder: Path) -> dict[str, Path]:
    return {b: write_rows(folder / FILE_NAMES[b], rows) for b, rows in ROWS.items()}


@pytest.fixture(scope="module")
def fixture_files(tmp_path_factory) -> dict[str, Path]:
    return write_fixtures(tmp_path_factory.mktemp("retention_data"))


@pytest.fixture(scope="module")
def generated(fixture_files, tmp_path_factory):
    """The written task folder and its tasks, loaded by lm-eval's TaskManager from that folder only."""
    from lm_eval.tasks import TaskManager

    out = tmp_path_factory.mktemp("retention_tasks")
    write_retention_tasks(fixture_files, out)
    loaded = TaskManager(include_path=str(out), include_defaults=False).load([GROUP])
    return out, loaded


def builtin_task(yaml_path: Path, rows: list[dict], splits: list[str]):
    """lm-eval's OWN task config, with only its data swapped for ``rows`` (in every split it names)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(yaml_path, resolve_func=True)
    cfg.pop("tag", None)
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict({s: datasets.Dataset.from_list(rows) for s in splits})
    return ConfigurableTask(config=cfg)


def rendered(task) -> list[tuple]:
    """What lm-eval sends the model for each document: context, choices, target, and the requests."""
    task.build_all_requests(rank=0, world_size=1)
    reqs = {}
    for inst in task.instances:
        reqs.setdefault(inst.doc_id, []).append(inst.arguments)
    docs = list(task.eval_docs)
    return [(task.fewshot_context(d, 0), task.doc_to_choice(d), task.doc_to_target(d), reqs[i])
            for i, d in enumerate(docs)]


# --------------------------------------------------------------------------- part 1: local files
def test_benchmark_facts_match_lm_evals_own_configs():
    from lm_eval.tasks._yaml_loader import load_yaml
    from lm_eval.utils import apply_template

    from evals.retention.write_tasks import MMLU_DESCRIPTION

    builtin_names = {"arc_challenge": "arc/arc_challenge.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
                     "winogrande": "winogrande/default.yaml"}
    subjects = mmlu_subjects()
    assert len(subjects) == 57 and "abstract_algebra" in subjects
    for bench, spec in BENCHMARKS.items():
        paths = ([lm_eval_tasks_dir() / "mmlu" / "default" / f"mmlu_{s}.yaml" for s in subjects] if bench == "mmlu"
                 else [lm_eval_tasks_dir() / builtin_names[bench]])
        for p in paths:
            cfg = load_yaml(p, resolve_func=False)
            assert cfg["dataset_path"] == spec.hub, p
            if bench != "mmlu":
                assert cfg.get("dataset_name") == spec.hub_config, p
            assert tuple(m["metric"] for m in cfg["metric_list"]) == spec.metrics, p
            named = {cfg.get(k) for k in ("training_split", "validation_split", "test_split", "fewshot_split")}
            assert named - {None} == set(spec.splits), p
            if bench == "mmlu":  # the one description template renders every subject's own description
                assert apply_template(MMLU_DESCRIPTION, {"subject": cfg["dataset_name"]}) == cfg["description"]


@pytest.mark.parametrize("bench", list(BENCHMARKS))
def test_generated_task_renders_exactly_like_lm_evals_builtin_task(bench, generated):
    _, loaded = generated
    ours = loaded["tasks"][task_name(bench)]
    assert len(ours.eval_docs) == len(ROWS[bench])
    if bench == "mmlu":  # lm-eval has one task per subject; ours is one task over all rows, in file order
        subjects = list(dict.fromkeys(r["subject"] for r in MMLU))
        expected = [x for s in subjects for x in rendered(builtin_task(
            lm_eval_tasks_dir() / "mmlu" / "default" / f"mmlu_{s}.yaml", [r for r in MMLU if r["subject"] == s],
            ["test", "dev"]))]
    else:
        expected = rendered(builtin_task(builtin_yaml(bench), ROWS[bench], list(BENCHMARKS[bench].splits)))
    got = rendered(ours)
    assert [g[:3] for g in got] == [e[:3] for e in expected]
    assert [g[3] for g in got] == [e[3] for e in expected]  # the (context, continuation) pairs scored
    # same metrics as the built-in task
    assert sorted(ours._metric_fn_list) == sorted(BENCHMARKS[bench].metrics)


def test_generated_prompts_spot_checks(generated):
    """Literal expectations, so a bug shared by both sides of the comparison above still fails."""
    _, loaded = generated
    mmlu = loaded["tasks"][task_name("mmlu")]
    doc = list(mmlu.eval_docs)[2]
    assert mmlu.fewshot_context(doc, 0) == (
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        "What is the embryological origin of the hyoid bone?\nA. The first pharyngeal arch\n"
        "B. The first and second pharyngeal arches\nC. The second pharyngeal arch\n"
        "D. The second and third pharyngeal arches\nAnswer:")
    assert mmlu.doc_to_target(doc) == 3 and mmlu.doc_to_choice(doc) == ["A", "B", "C", "D"]
    arc = loaded["tasks"][task_name("arc_challenge")]
    doc = list(arc.eval_docs)[3]
    assert arc.fewshot_context(doc, 0) == "Question: Which of the following is an example of a physical change?\nAnswer:"
    assert arc.doc_to_target(doc) == 1 and arc.doc_to_choice(doc) == ["rusting iron", "melting ice", "burning wood"]
    hs = loaded["tasks"][task_name("hellaswag")]
    assert hs.fewshot_context(list(hs.eval_docs)[2], 0) == "Home and Garden: How to grow tomatoes. Pick a sunny spot. tomatoes"
    # the !function helpers resolve to lm-eval's own files
    hs_utils = lm_eval_tasks_dir() / "hellaswag" / "utils.py"
    assert Path(inspect.getsourcefile(hs.config.process_docs)).resolve() == hs_utils.resolve()
    wg = loaded["tasks"][task_name("winogrande")]
    wg_helpers = lm_eval_tasks_dir() / "winogrande" / "preprocess_winogrande.py"
    for fn in (wg.config.doc_to_text, wg.config.doc_to_target, wg.config.doc_to_choice):
        assert Path(inspect.getsourcefile(fn)).resolve() == wg_helpers.resolve()
    assert wg.doc_to_choice(list(wg.eval_docs)[2])[1] == "They were worried the wine would ruin the bed and the " \
                                                         "blanket, but the None"


def test_group_averages_acc_and_acc_norm_over_the_given_benchmarks(generated, tmp_path, fixture_files):
    import yaml

    out, loaded = generated
    assert loaded["group_map"][GROUP] == [task_name(b) for b in BENCHMARKS]
    group = yaml.safe_load((out / f"{GROUP}.yaml").read_text())
    assert [(m["metric"], m["weight_by_size"]) for m in group["aggregate_metric_list"]] == [("acc", False),
                                                                                          ("acc_norm", False)]
    # again with fewer benchmarks: stale task files go, acc_norm only where a benchmark reports it
    write_retention_tasks({"winogrande": fixture_files["winogrande"]}, out)
    assert sorted(p.name for p in out.glob("*.yaml")) == [f"{GROUP}.yaml", f"{task_name('winogrande')}.yaml"]
    group = yaml.safe_load((out / f"{GROUP}.yaml").read_text())
    assert group["task"] == [task_name("winogrande")]
    assert [m["metric"] for m in group["aggregate_metric_list"]] == ["acc"]
    write_retention_tasks(fixture_files, out)  # restore for other tests sharing the folder


def test_csv_winogrande_keeps_its_string_cells(tmp_path):
    from lm_eval.tasks import TaskManager

    src = write_rows(tmp_path / "winogrande.csv", WINOGRANDE)
    write_retention_tasks({"winogrande": src}, tmp_path / "tasks")
    ours = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False).load(
        [task_name("winogrande")])["tasks"][task_name("winogrande")]
    assert list(ours.eval_docs) == WINOGRANDE  # "1"/"2" stay strings, the option "None" stays text
    expected = rendered(builtin_task(builtin_yaml("winogrande"), WINOGRANDE, ["train", "validation"]))
    assert rendered(ours) == expected


@pytest.mark.parametrize("bench", list(BENCHMARKS))
def test_missing_column_is_a_named_error_and_nothing_is_written(bench, fixture_files, tmp_path):
    from evals.retention.benchmarks import REQUIRED_COLUMNS

    column = REQUIRED_COLUMNS[bench][-1]
    bad = write_rows(tmp_path / FILE_NAMES[bench], [{k: v for k, v in r.items() if k != column} for r in ROWS[bench]])
    with pytest.raises(RetentionDataError) as err:
        write_retention_tasks({**fixture_files, bench: bad}, tmp_path / "out")
    msg = str(err.value)
    assert str(bad) in msg and bench in msg and repr(column) in msg and "expected the columns of" in msg
    assert BENCHMARKS[bench].hub in msg  # what was expected: the data set's format
    assert not (tmp_path / "out").exists()  # every file is checked before anything is written


@pytest.mark.parametrize("bench,rows,field,fragment", [
    ("arc_challenge", [{**ARC[0], "choices": {"text": ARC[0]["choices"]["text"]}}], "choices.label", "missing"),
    ("arc_challenge", [ARC[0], {**ARC[1], "answerKey": "F"}], "answerKey", "row 1"),
    ("winogrande", [{**WINOGRANDE[0], "answer": 1}], "answer", "expected the string '1' or '2'"),
    ("winogrande", [{**WINOGRANDE[0], "sentence": "no blank here"}], "sentence", "'_' blank"),
    ("hellaswag", [{**HELLASWAG[0], "label": ""}], "label", "unlabeled test rows"),
    ("mmlu", [{**MMLU[0], "answer": 4}], "answer", "integer 0-3"),
    ("mmlu", [{**MMLU[0], "choices": ["a", "b", "c"]}], "choices", "exactly 4"),
])
def test_bad_values_name_the_row_field_and_expectation(bench, rows, field, fragment, tmp_path):
    from evals.retention.benchmarks import validate_file

    path = write_rows(tmp_path / f"{bench}.jsonl", rows)
    with pytest.raises(RetentionDataError, match=r"row \d+") as err:
        validate_file(bench, path)
    msg = str(err.value)
    assert f"field {field!r}" in msg and fragment in msg and str(path) in msg and bench in msg


def test_missing_file_and_nested_columns_in_csv_are_named(tmp_path):
    from evals.retention.benchmarks import validate_file

    with pytest.raises(RetentionDataError, match=r"arc_challenge: file .*nope\.jsonl does not exist; expected"):
        validate_file("arc_challenge", tmp_path / "nope.jsonl")
    path = write_rows(tmp_path / "mmlu.csv", MMLU)  # a list column cannot be a CSV cell
    with pytest.raises(RetentionDataError, match=r"field 'choices': expected a list of exactly 4 strings"):
        validate_file("mmlu", path)
    (tmp_path / "mmlu.txt").write_text("x")
    with pytest.raises(RetentionDataError, match=r"unsupported file type '\.txt'"):
        validate_file("mmlu", tmp_path / "mmlu.txt")


def test_write_tasks_cli(fixture_files, tmp_path, capsys):
    from evals.retention.write_tasks import main

    assert main(["--out", str(tmp_path / "t"), "--arc_challenge", str(fixture_files["arc_challenge"])]) == 0
    out = capsys.readouterr().out
    assert f"opsdl_retention_arc_challenge: 4 rows from {fixture_files['arc_challenge']}" in out
    assert f"--include_path {tmp_path / 't'} --tasks opsdl_retention" in out
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path / "t2"), "--mmlu", str(fixture_files["arc_challenge"])])
    assert exit_.value.code == 2
    assert "mmlu: " in capsys.readouterr().err and not (tmp_path / "t2").exists()


# --------------------------------------------------------------------------- part 1: the datasets cache
def fake_hub_cache(cache: Path, path: str, config: str, splits: dict[str, list[dict]]) -> None:
    """A ``datasets`` cache entry as ``load_dataset(path, config)`` leaves it after a download."""
    import shutil

    import datasets

    name = path.split("/")[-1]
    d = cache / path.replace("/", "___") / config / "0.0.0" / "0123456789abcdef"
    d.mkdir(parents=True)
    infos = {}
    for split, rows in splits.items():
        ds = datasets.Dataset.from_list(rows)
        tmp = cache / "_tmp"
        ds.save_to_disk(str(tmp))
        shutil.copy(tmp / "data-00000-of-00001.arrow", d / f"{name}-{split}.arrow")
        shutil.rmtree(tmp)
        infos[split] = datasets.SplitInfo(name=split, num_examples=len(rows), dataset_name=name)
    info = ds.info
    info.config_name, info.dataset_name, info.splits = config, name, datasets.SplitDict(infos)
    info.write_to_directory(str(d))


def test_offline_availability_reports_cached_benchmarks_only(tmp_path, monkeypatch):
    import datasets

    from evals.retention.offline import offline_availability

    assert datasets.config.HF_HUB_OFFLINE  # conftest: the check runs in this process
    cache = tmp_path / "hf_datasets"
    res = offline_availability(cache_dir=str(cache))
    assert {b: a.available for b, a in res.items()} == dict.fromkeys(BENCHMARKS, False)
    assert "not in the datasets cache" in res["hellaswag"].detail

    fake_hub_cache(cache, "allenai/ai2_arc", "ARC-Challenge", {s: ARC for s in ("train", "validation", "test")})
    fake_hub_cache(cache, "allenai/winogrande", "winogrande_xl", {"validation": WINOGRANDE})  # no train split
    fake_hub_cache(cache, "cais/mmlu", "abstract_algebra", {"test": MMLU[:2], "dev": MMLU[:2]})  # 1 of 57 subjects
    res = offline_availability(cache_dir=str(cache))
    assert {b: a.available for b, a in res.items()} == {"mmlu": False, "arc_challenge": True, "hellaswag": False,
                                                        "winogrande": False}
    assert "cais/mmlu (anatomy) is not in the datasets cache" in res["mmlu"].detail  # the first missing subject
    assert "without the split(s) ['train']" in res["winogrande"].detail

    # "available" means lm-eval's OWN arc_challenge task builds from that cache offline
    task = builtin_task_from_cache(builtin_yaml("arc_challenge"), str(cache))
    assert [d["id"] for d in task.eval_docs] == [r["id"] for r in ARC]

    # any other error is not "unavailable": it is raised
    def broken(*a, **k):
        raise RuntimeError("corrupt arrow file")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(RuntimeError, match="corrupt arrow file"):
        offline_availability(["arc_challenge"], cache_dir=str(cache))


def test_offline_availability_switches_the_hub_off_in_a_child_process(tmp_path):
    """From a process where datasets is online, the check runs in a child with the hub switched off."""
    code = ("import json, datasets; assert not datasets.config.HF_HUB_OFFLINE\n"
            "from evals.retention.offline import offline_availability\n"
            f"r = offline_availability(['hellaswag'], cache_dir={str(tmp_path)!r})\n"
            "print(json.dumps({b: [a.available, a.detail] for b, a in r.items()}))")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ((available, detail),) = json.loads(proc.stdout.splitlines()[-1]).values()
    assert available is False and "OfflineModeIsEnabled" in detail  # no network was tried


def builtin_task_from_cache(yaml_path: Path, cache_dir: str):
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(yaml_path, resolve_func=True)
    cfg.pop("tag", None)
    cfg["dataset_kwargs"] = {"cache_dir": cache_dir}
    return ConfigurableTask(config=cfg)


# --------------------------------------------------------------------------- the lm_eval CLI

@pytest.mark.slow
def test_lm_eval_cli_runs_opsdl_retention_on_local_files(tiny_model_dir, tmp_path):
    files = write_fixtures(tmp_path / "data")
    write_retention_tasks(files, tmp_path / "tasks")
    res = run_lm_eval(["--model", "hf", "--model_args", f"pretrained={tiny_model_dir},dtype=float32",
                       "--include_path", str(tmp_path / "tasks"), "--tasks", GROUP], tmp_path / "out")
    results, n = res["results"], res["n-samples"]
    for bench in BENCHMARKS:
        r = results[task_name(bench)]
        assert 0.0 <= r["acc,none"] <= 1.0
        assert n[task_name(bench)]["effective"] == len(ROWS[bench])
        assert ("acc_norm,none" in r) == ("acc_norm" in BENCHMARKS[bench].metrics)
    accs = [results[task_name(b)]["acc,none"] for b in BENCHMARKS]
    assert results[GROUP]["acc,none"] == pytest.approx(sum(accs) / len(accs))
    norms = [results[task_name(b)]["acc_norm,none"] for b in ("arc_challenge", "hellaswag")]
    assert results[GROUP]["acc_norm,none"] == pytest.approx(sum(norms) / 2)
