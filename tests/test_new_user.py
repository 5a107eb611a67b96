"""`kubetune run` as a new user meets it: reruns into the same output, the model card's code, chat
templates, the state folder, the demos and --embedded-s3. Each test drives the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune.contract import EXIT_BAD_INPUT, EXIT_OK, MANIFEST_NAME
from kubetune.jobfile import write_job
from kubetune.samples import INSTRUCTIONS, sample_path
from kubetune.spec import StorageSpec
from kubetune.storage import Storage
from tests.fixtures_models import causal_job, classification_job
from tests.trainer_runs import KUBETUNE, RUN_TIMEOUT

ROOT = Path(__file__).resolve().parents[1]


def kubetune(*args: str, cwd: Path | None = None, state: Path | None = None) -> tuple[int, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("KUBETUNE_STATE_DIR", None)
    env.pop("KUBETUNE_WORK_DIR", None)
    if state is not None:
        env["KUBETUNE_STATE_DIR"] = str(state)
    done = subprocess.run([*KUBETUNE, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)
    return done.returncode, done.stdout + done.stderr


def output_listing(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and not p.relative_to(folder).as_posix().startswith("checkpoints/")}


def manifest_paths(folder: Path) -> set[str]:
    return {e["path"] for e in json.loads((folder / MANIFEST_NAME).read_text())["files"]}


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [json.loads(line) for line in sample_path(INSTRUCTIONS).read_text().splitlines()]
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if "messages" in r))
    return path


def tiny_causal(name: str, model: Path, train: Path, output: Path | str, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"hyperparameters": {"batchSize": 8, "maxSteps": 2, "precision": "fp32"},
                            "data": {"maxSeqLength": 96}, "method": {"type": "full"}}
    for key, value in spec.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return causal_job(name, model, train, output, **base)


# -- item 3: the output prefix holds exactly one run's files ---------------------------------------------------


def test_switching_lora_to_full_leaves_no_stale_adapter(tmp_path: Path, tiny_gpt2: Path, chat_data: Path) -> None:
    out = tmp_path / "out"
    job = write_job(tiny_causal("switch", tiny_gpt2, chat_data, out, method={"type": "lora"}), tmp_path / "job.yaml")
    code, log = kubetune("run", str(job), state=tmp_path / "state")
    assert code == EXIT_OK, log
    assert (out / "adapter").is_dir()

    write_job(tiny_causal("switch", tiny_gpt2, chat_data, out, method={"type": "full"}), job)
    code, log = kubetune("run", str(job), state=tmp_path / "state")
    assert code == EXIT_OK, log
    assert not (out / "adapter").exists()
    assert output_listing(out) == manifest_paths(out) | {MANIFEST_NAME}


def test_switching_method_in_s3_leaves_no_stale_objects(tmp_path: Path, tiny_gpt2: Path, chat_data: Path,
                                                         s3_server: Any, s3_bucket: str) -> None:
    output = f"s3://{s3_bucket}/switch/"
    storage_spec = {"endpoint": s3_server.endpoint}
    job = write_job(tiny_causal("switch", tiny_gpt2, chat_data, output, method={"type": "lora"},
                                storage=storage_spec), tmp_path / "job.yaml")
    assert kubetune("run", str(job), state=tmp_path / "state")[0] == EXIT_OK
    write_job(tiny_causal("switch", tiny_gpt2, chat_data, output, method={"type": "full"}, storage=storage_spec),
              job)
    code, log = kubetune("run", str(job), state=tmp_path / "state")
    assert code == EXIT_OK, log
    storage = Storage(StorageSpec(endpoint=s3_server.endpoint))
    keys = {k.removeprefix("switch/") for k, _ in storage.s3().list_objects(output)}
    keys = {k for k in keys if not k.startswith("checkpoints/")}
    manifest = storage.read_manifest(output)
    assert manifest is not None
    assert keys == {e["path"] for e in manifest["files"]} | {MANIFEST_NAME}
    assert not any(k.startswith("adapter/") for k in keys)


def test_an_output_folder_with_foreign_files_is_refused_before_training(tmp_path: Path, tiny_gpt2: Path,
                                                                        chat_data: Path) -> None:
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "mine.txt").write_text("not kubetune's")
    job = write_job(tiny_causal("foreign", tiny_gpt2, chat_data, out), tmp_path / "job.yaml")
    code, log = kubetune("run", str(job), state=tmp_path / "state")
    assert code == EXIT_BAD_INPUT, log
    assert "spec.output.uri" in log and "notes/mine.txt" in log and "Traceback" not in log
    assert sorted(p.name for p in out.rglob("*")) == ["mine.txt", "notes"], "nothing may be written"


# -- items 6, 7 and issue 13 (9, 12): outputs a user can use ---------------------------------------------------


def card_snippets(output: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (output / "README.md").read_text(), re.S)


def run_snippet(code: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert done.returncode == 0, f"the model card's code failed:\n{code}\n{done.stderr[-3000:]}"
    return done.stdout


def test_model_card_code_runs_as_written_for_three_classes(tmp_path: Path, minilm_path: Path) -> None:
    """A headline classifier from a CSV with its own column names, as the user in issue 7 wrote one."""
    topics = {"sport": "the team won the match", "politics": "the parliament passed the law",
              "science": "researchers measured the particle"}
    lines = ["headline,topic"] + [f"{text} {i},{topic}" for i in range(20) for topic, text in topics.items()]
    (tmp_path / "headlines.csv").write_text("\n".join(lines) + "\n")
    doc = classification_job("headlines", minilm_path, "headlines.csv", "out",
                             data={"textField": "headline", "labelField": "topic"}, hyperparameters={"maxSteps": 2})
    doc["spec"]["model"]["labels"] = list(topics)
    job = write_job(doc, tmp_path / "job.yaml")
    code, log = kubetune("run", str(job), cwd=tmp_path)
    assert code == EXIT_OK, log
    out = tmp_path / "out"
    snippets = card_snippets(out)
    assert len(snippets) == 2  # the merged pipeline and the adapter on the base model
    assert "pipeline(" in snippets[0] and "num_labels" in snippets[1] and "id2label" in snippets[1]
    for snippet in snippets:
        printed = run_snippet(snippet, out)
        assert any(topic in printed for topic in topics), printed
    assert json.loads((out / "merged" / "config.json").read_text())["id2label"] == {
        str(i): t for i, t in enumerate(topics)}


def test_chat_outputs_ship_the_template_training_used(tmp_path: Path, tiny_gpt2: Path, chat_data: Path) -> None:
    from transformers import AutoTokenizer

    from kubetune.data.encode import encode_causal_lm

    out = tmp_path / "out"
    job = write_job(tiny_causal("chat", tiny_gpt2, chat_data, out, method={"type": "lora"}), tmp_path / "job.yaml")
    code, log = kubetune("run", str(job), state=tmp_path / "state")
    assert code == EXIT_OK, log
    conversation = json.loads(chat_data.read_text().splitlines()[0])["messages"]
    base = AutoTokenizer.from_pretrained(tiny_gpt2)
    (seen,) = encode_causal_lm([{"messages": conversation}], base, max_length=4096)  # what training saw
    for folder in ("merged", "adapter"):
        saved = AutoTokenizer.from_pretrained(out / folder)
        assert saved.apply_chat_template(conversation, tokenize=False) == saved.decode(seen["input_ids"])
    card = (out / "README.md").read_text()
    assert "apply_chat_template" in card and "<|assistant|>" in card  # a prompt example, as rendered
    run_snippet(card_snippets(out)[0], out)
    # issue 13, defect 12: the saved model generates with its KV cache, as the base did
    assert json.loads((out / "merged" / "config.json").read_text())["use_cache"] is True


def test_chatml_template_trains_on_exactly_what_it_renders(tiny_gpt2: Path) -> None:
    """Issue 13, defect 9: ChatML ends turns with <|im_end|>, and EOS is another token: no EOS is added."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from kubetune.data.encode import IGNORE_INDEX, encode_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken("<|im_start|>", special=True),
                                                                AddedToken("<|im_end|>", special=True)]})
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    chat = [{"role": "user", "content": "two plus two?"}, {"role": "assistant", "content": "four"},
            {"role": "user", "content": "and three?"}, {"role": "assistant", "content": "five"}]
    (example,) = encode_causal_lm([{"messages": chat}], tokenizer, max_length=256)
    assert tokenizer.eos_token_id not in example["input_ids"]
    assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(chat, tokenize=False)
    trained = tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])
    assert trained == "four<|im_end|>\nfive<|im_end|>\n"


# -- items 11, 12, 13: messages and the state folder -------------------------------------------------------------


def test_a_missing_relative_path_names_where_it_was_looked_for(tmp_path: Path, minilm_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    write_job(classification_job("missing", minilm_path, "data/train.csv", "out"), tmp_path / "jobs" / "j.yaml")
    elsewhere = tmp_path / "shell"
    elsewhere.mkdir()
    code, log = kubetune("run", "../jobs/j.yaml", cwd=elsewhere)
    assert code == EXIT_BAD_INPUT, log
    assert f"spec.data.train: data/train.csv: no such file or folder (looked for {tmp_path / 'jobs/data/train.csv'}" \
        in log
    assert f"relative paths are relative to {tmp_path / 'jobs'}" in log and "Traceback" not in log


@pytest.mark.parametrize(("spec", "expected"), [
    ({"method": "lora"}, "spec.method: expected an object, not 'lora'; write `method: {type: lora}`"),
    ({"hyperparameters": {"learningrate": 0.1}}, "spec.hyperparameters.learningrate: unknown field; "
                                                 "did you mean learningRate?"),
    ({"hyperparameters": {"batch_size": 4}}, "spec.hyperparameters.batch_size: unknown field; did you mean "
                                             "batchSize? (fields are camelCase)"),
    ({"data": {"text_field": "t"}}, "spec.data.text_field: unknown field; did you mean textField?"),
])
def test_spec_mistakes_get_a_message_that_shows_the_fix(tmp_path: Path, spec: dict[str, Any], expected: str) -> None:
    doc = classification_job("typo", "model", "train.jsonl", "out", **spec)
    code, log = kubetune("validate", str(write_job(doc, tmp_path / "job.yaml")))
    assert code == EXIT_BAD_INPUT, log
    assert expected in log and "Traceback" not in log


def test_a_tokenizer_with_ids_beyond_the_embedding_is_bad_input(tmp_path: Path, tiny_gpt2: Path) -> None:
    """Tokens added to the tokenizer without resizing the model: before, an IndexError traceback and exit 1 (on
    CUDA a device-side assert); now exit 2 naming spec.model.uri and the token, before the weights load."""
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_gpt2, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    tokenizer.add_tokens(["<|tool|>"])
    tokenizer.save_pretrained(model)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"<|tool|> call {i}", "completion": " done"}) + "\n"
                             for i in range(40)))
    job = write_job(tiny_causal("added", model, train, tmp_path / "out"), tmp_path / "job.yaml")
    code, log = kubetune("run", str(job))
    assert code == EXIT_BAD_INPUT, log
    assert f"spec.model.uri: {model}: the tokenizer produces token id {vocab} ('<|tool|>')" in log
    assert f"embedding has {vocab} rows" in log and "Traceback" not in log
    assert not (tmp_path / "out").exists()


def test_prompts_that_fill_max_seq_length_name_the_field(tmp_path: Path, tiny_gpt2: Path) -> None:
    """Before: "0 training examples are too few for batchSize 8", which sent users to the data, not the length."""
    train = tmp_path / "long.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"question {i} " + "words " * 150, "completion": " yes"}) + "\n"
                             for i in range(30)))
    job = write_job(tiny_causal("long", tiny_gpt2, train, tmp_path / "out"), tmp_path / "job.yaml")
    code, log = kubetune("run", str(job))
    assert code == EXIT_BAD_INPUT, log
    assert re.search(r"spec.data.maxSeqLength: 96 tokens leave no completion token in any of the \d+ training "
                     r"examples", log), log
    assert "Traceback" not in log and not (tmp_path / "out").exists()


def test_a_validation_split_that_truncation_empties_names_the_split(tmp_path: Path, tiny_gpt2: Path) -> None:
    """Before: the run trained without any evaluation (no eval loss, no best model, no early stopping), and the
    only sign was a warning that did not say which split lost its examples."""
    train, validation = tmp_path / "train.jsonl", tmp_path / "validation.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"question {i}", "completion": " yes"}) + "\n" for i in range(40)))
    validation.write_text("".join(json.dumps({"prompt": f"question {i} " + "words " * 150, "completion": " no"})
                                  + "\n" for i in range(10)))
    job = write_job(tiny_causal("long-val", tiny_gpt2, train, tmp_path / "out", data={"validation": str(validation)}),
                    tmp_path / "job.yaml")
    code, log = kubetune("run", str(job))
    assert code == EXIT_BAD_INPUT, log
    assert "spec.data.maxSeqLength: 96 tokens leave no completion token in any of the 10 validation examples" in log
    assert "Traceback" not in log and not (tmp_path / "out").exists()


def test_a_process_count_below_one_is_a_usage_error(tmp_path: Path) -> None:
    """Before: 0 and -1 quietly trained in one process."""
    job = write_job(classification_job("procs", "model", "train.jsonl", "out"), tmp_path / "job.yaml")
    for bad in ("0", "-1"):
        code, log = kubetune("run", "--nproc-per-node", bad, str(job))
        assert code == EXIT_BAD_INPUT, log
        assert f"--nproc-per-node: expected a whole number of 1 or more, not '{bad}'" in log, log


def test_state_goes_beside_the_manifest_not_the_shell(tmp_path: Path, tiny_gpt2: Path, chat_data: Path) -> None:
    (tmp_path / "jobs").mkdir()
    job = write_job(tiny_causal("placed", tiny_gpt2, chat_data, tmp_path / "out"), tmp_path / "jobs" / "job.yaml")
    shell = tmp_path / "shell"
    shell.mkdir()
    code, log = kubetune("run", str(job), cwd=shell)
    assert code == EXIT_OK, log
    assert (tmp_path / "jobs" / ".kubetune" / "runs" / "placed" / "job.yaml").is_file()
    assert list(shell.iterdir()) == []


# -- items 9, 10: the demos and --embedded-s3 --------------------------------------------------------------------


def test_demo_llm_keeps_the_other_demos_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                tiny_gpt2: Path) -> None:
    from kubetune import demo

    examples = tmp_path / "examples"
    examples.mkdir()
    text = (ROOT / "examples" / "instructions-causal-lm.yaml").read_text()
    (examples / "instructions-causal-lm.yaml").write_text(text.replace("epochs: 6", "epochs: 1\n    maxSteps: 2"))
    monkeypatch.setattr(demo, "ROOT", tmp_path)
    monkeypatch.setattr(demo, "DEMO", tmp_path / ".kubetune" / "demo")
    monkeypatch.setenv("KUBETUNE_STATE_DIR", str(tmp_path / "state"))
    other = tmp_path / ".kubetune" / "demo" / "output" / "reviews-sentiment"
    other.mkdir(parents=True)
    (other / "README.md").write_text("the classifier demo's model card")
    (tmp_path / ".kubetune" / "demo" / "models").mkdir(parents=True)
    os.symlink(tiny_gpt2, tmp_path / ".kubetune" / "demo" / "models" / "tiny-gpt2")
    assert demo.main(["--llm"]) == EXIT_OK
    assert (other / "README.md").read_text() == "the classifier demo's model card"
    assert (tmp_path / ".kubetune" / "demo" / "output" / "instructions-tiny-gpt2" / MANIFEST_NAME).is_file()


def test_embedded_s3_leaves_a_verified_local_copy(tmp_path: Path, tiny_gpt2: Path, chat_data: Path) -> None:
    out = tmp_path / "out"
    job = write_job(tiny_causal("embedded", tiny_gpt2, chat_data, out), tmp_path / "job.yaml")
    code, log = kubetune("run", str(job), "--embedded-s3", state=tmp_path / "state")
    assert code == EXIT_OK, log
    # trained against the embedded S3, then the verified output copied out of it, without the checkpoints
    assert f"verified copy of the output in {out}" in log and not (out / "checkpoints").exists()
    Storage().fetch(str(out), tmp_path / "unused")  # verifies every file against manifest.json
    assert {"merged/config.json", "README.md", "run.json"} <= manifest_paths(out)
    assert "output -> s3://kubetune-outputs/embedded/" in log  # the run itself went through S3


# -- item 14: the README -----------------------------------------------------------------------------------------


def test_readme_links_stay_inside_the_repository() -> None:
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)", readme) + re.findall(r"`(\.\./[^`]*)`", readme):
        if "://" in target:
            continue
        resolved = (ROOT / target).resolve()
        assert resolved.is_relative_to(ROOT) and resolved.exists(), f"README points at {target}"
