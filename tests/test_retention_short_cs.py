"""Short-context retention without downloads (part 2 of the retention tests): the opsdl_short_cs
task is the pipeline's own C_s questions, fed to lm-eval as the pipeline's teacher prompt ids."""

from __future__ import annotations

import json

import pytest
from lm_eval_cli import ROOT, run_lm_eval


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_short_cs_docs_are_the_pipelines_cs_questions(tiny_tokenizer):
    from evals.retention.short_cs import SUITES, build_docs
    from opsdl_core.data.curation import eval_suites
    from opsdl_core.data.prepare import token_counter
    from opsdl_core.data.prompts import user_message
    from opsdl_core.data.tasks.needle import HELDOUT_TEMPLATES, TRAIN_TEMPLATES

    docs = build_docs(tiny_tokenizer, num_samples=3, seed=0, context_tokens=256)
    assert [d["suite"] for d in docs] == [SUITES[0]] * 3 + [SUITES[1]] * 3
    assert {d["template"] for d in docs[:3]} <= {t.name for t in HELDOUT_TEMPLATES}
    assert {d["template"] for d in docs[3:]} <= {t.name for t in TRAIN_TEMPLATES}
    # the pipeline's held-out suites at this seed and length, asked with C_s only
    suites = eval_suites(count_tokens=token_counter(tiny_tokenizer), lengths=[256], n=3, seed=0, in_template_n=3)
    examples = suites["kv_heldout@256"] + suites["kv_in_template@256"]
    assert [d["id"] for d in docs] == [e.id for e in examples]
    assert [d["short_context"] for d in docs] == [e.short_context for e in examples]
    for d, e in zip(docs, examples):  # the raw user message: lm-eval applies the chat template
        assert d["prompt"] == user_message(e.short_context, e.question)
        assert e.long_context not in d["prompt"] and tiny_tokenizer.bos_token not in d["prompt"]
    assert build_docs(tiny_tokenizer, num_samples=3, seed=0, context_tokens=256) == docs  # seeded
    assert [d["id"] for d in build_docs(tiny_tokenizer, num_samples=3, seed=1, context_tokens=256)] != \
        [d["id"] for d in docs]


def test_lm_eval_feeds_the_pipelines_teacher_prompt_ids_under_apply_chat_template(tiny_tokenizer, tiny_model_dir):
    """Through lm-eval's own code: the task from its TaskManager, the requests from
    ``build_all_requests(apply_chat_template=True, chat_template=HFLM.apply_chat_template)`` as
    ``simple_evaluate`` builds them (the CLI turns ``fewshot_as_multiturn`` on with the chat
    template), and the ids that ``HFLM.generate_until`` hands to the model's ``generate``."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from opsdl_core.config import DataConfig
    from opsdl_core.data.curation import eval_suites
    from opsdl_core.data.prepare import prepare_examples, token_counter
    from opsdl_core.data.prompts import chat_prompt_ids

    tm = TaskManager(include_path=str(ROOT / "evals" / "retention" / "tasks"), include_defaults=False,
                     metadata={"pretrained": str(tiny_model_dir), "num_samples": 3, "context_tokens": 256})
    task = tm.load(["opsdl_short_cs"])["tasks"]["opsdl_short_cs"]
    lm = HFLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", batch_size=1)
    suites = eval_suites(count_tokens=token_counter(tiny_tokenizer), lengths=[256], n=3, seed=0, in_template_n=3)
    teacher = {}
    for suite in ("kv_heldout@256", "kv_in_template@256"):
        prepared, bad = prepare_examples(suites[suite], tiny_tokenizer, DataConfig(teacher_context="oracle"))
        assert not bad
        for p in prepared:
            assert p.teacher_ids == chat_prompt_ids(tiny_tokenizer, p.teacher_context.text, p.example.question)
            teacher[p.example.id] = p.teacher_ids
    assert len(teacher) == 6

    # without the chat template lm-eval would feed other ids: the comparison below can fail
    task.build_all_requests(rank=0, world_size=1)
    plain = {inst.doc["id"]: lm.tok_encode(inst.arguments[0]) for inst in task.instances}
    assert len(plain) == 6 and all(plain[i] != teacher[i] for i in teacher)

    task.build_all_requests(rank=0, world_size=1, apply_chat_template=True, fewshot_as_multiturn=True,
                            chat_template=lm.apply_chat_template, tokenizer_name=lm.tokenizer_name)
    instances = task.instances
    assert sorted(inst.doc["id"] for inst in instances) == sorted(teacher)
    contexts, fed = [], []  # what generate_until encodes, and the ids it hands to generate
    encode, generate = lm.tok_batch_encode, lm._model_generate

    def tok_batch_encode(strings, *args, **kwargs):
        contexts.append(list(strings))
        return encode(strings, *args, **kwargs)

    def model_generate(context, *args, attention_mask=None, **kwargs):
        assert attention_mask is None or bool(attention_mask.all())  # batch of one: no padding
        fed.append(context.tolist())
        return generate(context, *args, attention_mask=attention_mask, **kwargs)

    lm.tok_batch_encode, lm._model_generate = tok_batch_encode, model_generate
    outputs = lm.generate_until(instances, disable_tqdm=True)
    assert len(outputs) == len(instances) == len(fed) == len(contexts) == 6
    doc_of = {inst.arguments[0]: inst.doc for inst in instances}
    for (ctx,), (ids,) in zip(contexts, fed):
        doc = doc_of[ctx]
        assert ctx.startswith(tiny_tokenizer.bos_token) and doc["prompt"] in ctx  # the template, applied by lm-eval
        assert ids == teacher[doc["id"]], doc["id"]
        assert lm.tok_encode(ctx) == teacher[doc["id"]]


def test_short_cs_task_loads_with_metadata_and_scores_per_suite(tiny_model_dir):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(ROOT / "evals" / "retention" / "tasks"), include_defaults=False,
                     metadata={"pretrained": str(tiny_model_dir), "num_samples": 2, "context_tokens": 256})
    task = tm.load(["opsdl_short_cs"])["tasks"]["opsdl_short_cs"]
    docs = list(task.eval_docs)
    assert len(docs) == 4 and [d["suite"] for d in docs] == ["kv_heldout"] * 2 + ["kv_in_template"] * 2
    assert sorted(task._metric_fn_list) == ["kv_heldout", "kv_in_template"]
    assert task.config.generation_kwargs["do_sample"] is False
    d = docs[0]
    assert task.doc_to_text(d) == d["prompt"]  # the raw user message; --apply_chat_template wraps it
    assert task.process_results(d, [f" The answer is {d['answer']}."]) == {d["suite"]: 1.0}
    assert task.process_results(d, ["I do not know."]) == {d["suite"]: 0.0}
    both = f"{d['answer']} or {d['distractor_answers'][0]}"  # naming a distractor's value earns nothing
    assert task.process_results(d, [both]) == {d["suite"]: 0.0}


def test_opsdl_short_group_holds_short_cs_and_the_ruler_group(tiny_model_dir):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(ROOT / "evals"), include_defaults=False,
                     metadata={"pretrained": str(tiny_model_dir), "num_samples": 1, "context_tokens": 256,
                               "max_seq_lengths": [1024]})
    loaded = tm.load(["opsdl_short"])
    assert loaded["group_map"]["opsdl_short"] == ["opsdl_short_cs", "opsdl_ruler"]
    assert len(loaded["tasks"]["opsdl_short_cs"].eval_docs) == 2
    ruler = [t for n, t in loaded["tasks"].items() if n.startswith("opsdl_ruler_")]
    assert ruler and all({d["length"] for d in t.eval_docs} == {1024} for t in ruler)



@pytest.mark.slow
def test_lm_eval_cli_runs_opsdl_short_cs_offline(tiny_model_dir, tmp_path):
    res = run_lm_eval(["--model", "hf", "--model_args", f"pretrained={tiny_model_dir},dtype=float32",
                       "--include_path", str(ROOT / "evals" / "retention" / "tasks"), "--tasks", "opsdl_short_cs",
                       "--apply_chat_template", "--metadata", '{"num_samples": 4, "context_tokens": 256}'],
                      tmp_path / "out")
    r = res["results"]["opsdl_short_cs"]
    assert 0.0 <= r["kv_heldout,none"] <= 1.0 and 0.0 <= r["kv_in_template,none"] <= 1.0
    # 8 documents; lm-eval's "effective" count is one metric's sample count, i.e. one suite's (4)
    assert res["n-samples"]["opsdl_short_cs"] == {"original": 8, "effective": 4}
    (samples_file,) = list((tmp_path / "out").rglob("samples_opsdl_short_cs_*.jsonl"))
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert sorted(s["doc"]["suite"] for s in samples) == ["kv_heldout"] * 4 + ["kv_in_template"] * 4
    from transformers import AutoTokenizer

    from evals.retention.short_cs import score

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for s in samples:  # each sample scored only under its own suite, as score_answer scores its output
        assert s[s["doc"]["suite"]] == score(s["doc"], s["resps"][0][0])
        # the context is the user message in the model's chat template, applied by lm-eval
        assert s["arguments"]["gen_args_0"]["arg_0"] == tok.apply_chat_template(
            [{"role": "user", "content": s["doc"]["prompt"]}], tokenize=False, add_generation_prompt=True)
