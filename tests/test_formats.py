"""Data formats people already have: TRL prompt-completion, Alpaca, ShareGPT, SAPO's own {prompt, chosen} and
{messages}, from JSONL files, JSON arrays and local `datasets` folders (parquet, hub layout); --columns for anything
else; a BOM and Windows line endings; --model FILE.gguf; and the one-line error of each mistake."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import CHATML, ROOT, _tokenizer, write_jsonl

import sapo
import sapo_utils.data
import sapo_utils.models

ANSWER = "Pour hot water over the leaves, wait three minutes, then remove them."
SYSTEM = "Answer briefly."


def _q(i):
    return f"How do I brew tea number {i}?"


# One row per format, i-th of a dataset; PARSED is what each must become: (prompt messages, chosen, rejected)
FORMATS = {
    "preference": lambda i: {"prompt": _q(i), "chosen": ANSWER, "rejected": "Boil the leaves for an hour."},
    "preference_messages": lambda i: {"prompt": [{"role": "user", "content": _q(i)}],
                                      "chosen": [{"role": "assistant", "content": ANSWER}]},
    "prompt_completion": lambda i: {"prompt": _q(i), "completion": ANSWER},
    "prompt_completion_messages": lambda i: {"prompt": [{"role": "system", "content": SYSTEM},
                                                        {"role": "user", "content": _q(i)}],
                                             "completion": [{"role": "assistant", "content": ANSWER}]},
    "messages": lambda i: {"messages": [{"role": "user", "content": _q(i)}, {"role": "assistant", "content": ANSWER}]},
    "sharegpt": lambda i: {"id": f"c{i}", "conversations": [{"from": "system", "value": SYSTEM},
                                                            {"from": "human", "value": _q(i)},
                                                            {"from": "gpt", "value": ANSWER}]},
    "alpaca": lambda i: {"instruction": _q(i), "input": "Green tea." if i % 2 else "", "output": ANSWER},
}


def expected(fmt, i):
    user = {"role": "user", "content": _q(i)}
    system = {"role": "system", "content": SYSTEM}
    if fmt == "preference":
        return [user], ANSWER, "Boil the leaves for an hour."
    if fmt in ("prompt_completion_messages", "sharegpt"):
        return [system, user], ANSWER, None
    if fmt == "alpaca" and i % 2:
        return [{"role": "user", "content": _q(i) + "\n\nGreen tea."}], ANSWER, None   # Alpaca's blank-line join
    return [user], ANSWER, None


def parsed(source, columns="", split="train"):
    return [p for _, _, p in sapo_utils.data.parse_rows(sapo_utils.data.read_rows(str(source), split), columns)]


def hub_folder(path: Path, rows) -> Path:
    """A local dataset in the hub's layout: folder/data/train-00000-of-00001.parquet."""
    import datasets
    (path / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path / "data" / "train-00000-of-00001.parquet"))
    return path


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_format_from_jsonl_and_from_a_datasets_folder(fmt, tmp_path):
    rows = [FORMATS[fmt](i) for i in range(4)]
    want = [expected(fmt, i) for i in range(4)]
    assert parsed(write_jsonl(tmp_path / "d.jsonl", rows)) == want
    assert parsed(hub_folder(tmp_path / "folder", rows)) == want


def test_precedence_documented_in_parse_row():
    both = {"prompt": "A?", "chosen": "B.", "completion": "C.", "messages": [{"role": "user", "content": "D?"},
            {"role": "assistant", "content": "E."}], "instruction": "F?", "output": "G."}
    assert sapo_utils.data.parse_row(both, "f:1")[1] == "B."                                   # 1. {prompt, chosen}
    assert sapo_utils.data.parse_row({k: both[k] for k in both if k != "chosen"}, "f:1")[1] == "C."   # 2. {prompt, completion}
    assert sapo_utils.data.parse_row({k: both[k] for k in ("messages", "instruction", "output")}, "f:1")[1] == "E."
    assert sapo_utils.data.parse_row({"conversations": [{"from": "user", "value": "H?"}, {"from": "assistant", "value": "I."}],
                           "instruction": "F?", "output": "G."}, "f:1")[1] == "I."     # 4. before 5.
    nulls = {"prompt": None, "completion": None, "instruction": "F?", "output": "G."}   # null = absent
    assert sapo_utils.data.parse_row(nulls, "f:1")[1] == "G."
    doc = sapo_utils.data.parse_row.__doc__
    order = [doc.index(s) for s in ("{prompt, chosen", "{prompt, completion}", "{messages}", "{conversations}",
                                    "{instruction")]
    assert order == sorted(order)


def test_bom_and_windows_line_endings(tmp_path):
    rows = [FORMATS["alpaca"](i) for i in range(3)]
    path = tmp_path / "win.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\r\n" for r in rows).encode() + b"\r\n")
    assert parsed(path) == [expected("alpaca", i) for i in range(3)]
    path.write_bytes(b"\xef\xbb\xbf" + "\r".join(json.dumps(r) for r in rows).encode())   # old Mac line ends
    assert [w for w, _ in sapo_utils.data.read_rows(str(path))] == [f"{path}:{n}" for n in (1, 2, 3)]


def test_json_array_and_single_parquet_and_csv_files(tmp_path):
    import datasets
    rows = [FORMATS["alpaca"](i) for i in range(3)]
    (tmp_path / "alpaca_data.json").write_text(json.dumps(rows, indent=4))      # Alpaca's own file is one JSON array
    assert parsed(tmp_path / "alpaca_data.json") == [expected("alpaca", i) for i in range(3)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "a.csv"), index=False)
    for name in ("a.parquet", "a.csv"):
        assert [p[1] for p in parsed(tmp_path / name)] == [ANSWER] * 3


def test_columns_mapping(tmp_path):
    rows = [{"question": _q(i), "answer": ANSWER, "bad": "No.", "prompt": "ignored"} for i in range(3)]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    assert parsed(data, "prompt=question,chosen=answer") == [expected("preference", i)[:2] + (None,) for i in range(3)]
    assert parsed(data, " prompt = question , chosen=answer, rejected=bad")[0][2] == "No."
    # a mapped format goes before the row's own fields: here {messages} over {prompt, chosen}
    turns = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    data2 = write_jsonl(tmp_path / "both.jsonl", [{"prompt": "x", "chosen": "y", "dialog": turns}])
    assert parsed(data2, "messages=dialog") == [([turns[0]], "A.", None)]
    assert parsed(hub_folder(tmp_path / "qa", rows), "prompt=question,chosen=answer")[2][1] == ANSWER


# ---------------------------------------------------------------------------------------------------
# Training runs: every format through the command line's main(), one through `python sapo.py`
# ---------------------------------------------------------------------------------------------------

def train_args(model, data, out, *extra):
    return ["--model", str(model), "--dataset", str(data), "--output-dir", str(out), "--max-steps", "1",
            "--batch-size", "2", "--segment-len", "4", "--eval-size", "1", "--save-steps", "-1", *extra]


@pytest.mark.parametrize("fmt", ["prompt_completion", "prompt_completion_messages", "sharegpt", "alpaca"])
def test_new_formats_train(fmt, tmp_path, tiny_llama_dir, capsys):
    rows = [FORMATS[fmt](i) for i in range(6)]
    data = write_jsonl(tmp_path / "d.jsonl", rows) if fmt != "sharegpt" else hub_folder(tmp_path / "sg", rows)
    assert sapo.main(train_args(tiny_llama_dir, data, tmp_path / "out")) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()


def test_cli_trains_on_an_alpaca_file_with_bom_and_crlf(tmp_path, tiny_llama_dir):
    data = tmp_path / "alpaca.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(FORMATS["alpaca"](i)) + "\r\n" for i in range(6)).encode())
    p = subprocess.run([sys.executable, str(ROOT / "sapo.py"), *train_args(tiny_llama_dir, data, tmp_path / "o")],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "o" / "final" / "config.json").exists()


def test_columns_on_a_datasets_folder_train(tmp_path, tiny_llama_dir, capsys):
    folder = hub_folder(tmp_path / "qa", [{"q": _q(i), "a": ANSWER} for i in range(6)])
    args = train_args(tiny_llama_dir, folder, tmp_path / "o", "--columns", "prompt=q,chosen=a")
    assert sapo.main(args) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "o" / "config.json").read_text())["columns"] == "prompt=q,chosen=a"


# ---------------------------------------------------------------------------------------------------
# Each mistake: one line on stderr, exit code 2, no output folder
# ---------------------------------------------------------------------------------------------------

UNRECOGNIZED = ("unrecognized row with fields [question, answer]; expected one of: {prompt, chosen[, rejected]}, "
                "{prompt, completion}, {messages}, {conversations} (ShareGPT), {instruction[, input], output} "
                "(Alpaca), or pass --columns")
BAD = {   # rows (or raw bytes), extra flags, the expected message after the file name
    "unrecognized": ([{"question": "a", "answer": "b"}], [], ":1: " + UNRECOGNIZED),
    "mixed_formats": ([FORMATS["alpaca"](0), FORMATS["alpaca"](1), FORMATS["sharegpt"](2)], [],
                      ":3: a {conversations} (ShareGPT) row, but the first row is {instruction[, input], output} "
                      "(Alpaca): one format per dataset"),
    "missing_field_later": ([FORMATS["prompt_completion"](0), {"prompt": "a"}], [],
                            ":2: field 'completion' is missing (the rows here are {prompt, completion}"),
    "sharegpt_unknown_role": ([{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}],
                              [], ":1: field 'conversations[1]' has the unknown role 'bot' (known: human, user, gpt, "
                                  "assistant, system)"),
    "sharegpt_bad_turn": ([{"conversations": [{"from": "human"}, {"from": "gpt", "value": "b"}]}], [],
                          ":1: field 'conversations[0]' must be {\"from\": str, \"value\": str}"),
    "sharegpt_ends_with_user": ([{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}],
                                [], ":1: field 'conversations' must end with an assistant turn"),
    "alpaca_empty_output": ([{"instruction": "a", "input": "", "output": " "}], [], ":1: field 'output' is empty"),
    "alpaca_bad_input": ([{"instruction": "a", "input": 3, "output": "b"}], [], ":1: field 'input' must be a string"),
    "completion_label_false": ([{"prompt": "a", "completion": "b", "label": False}], [],
                               ":1: field 'label' is false: an undesirable completion cannot be a good response"),
    "columns_missing_column": ([{"question": "a", "answer": "b"}], ["--columns", "prompt=question,chosen=reply"],
                               ":1: --columns chosen=reply: the first row has no column 'reply' "
                               "(its columns: [question, answer])"),
    "columns_missing_later": ([{"question": "a", "answer": "b"}, {"question": "c"}],
                              ["--columns", "prompt=question,chosen=answer"],
                              ":2: column 'answer' is missing (--columns chosen=answer)"),
    "columns_no_format": ([{"question": "a", "answer": "b"}], ["--columns", "prompt=question"],
                          ":1: with --columns prompt=question the first row has the fields [question, answer, prompt], "
                          "which make no format"),
    "columns_unknown_field": ([{"question": "a", "answer": "b"}], ["--columns", "prompt=question,answer=answer"],
                              "--columns: unknown field 'answer' (fields: prompt, chosen, rejected, completion, "),
    "columns_syntax": ([{"question": "a", "answer": "b"}], ["--columns", "prompt:question"],
                       "--columns: expected field=column pairs separated by commas"),
    "utf16": (b"\xff\xfe" + '{"prompt": "a", "chosen": "b"}\n'.encode("utf-16-le"), [],
              ": UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8"),
    "json_array_broken": (b'[\n {"prompt": "a", "chosen": "b"},\n {"prompt": \n]\n', [],
                          ":4: invalid JSON: Expecting value (column 1)"),
    "bom_then_bad_json": (b'\xef\xbb\xbf{"prompt": "a", "chosen": "b"}\r\n{"prompt": }\r\n', [],
                          ":2: invalid JSON: Expecting value (column 12)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_exit_2(case, tmp_path, tiny_llama_dir, capsys):
    rows, extra, message = BAD[case]
    data = tmp_path / "d.jsonl"
    data.write_bytes(rows) if isinstance(rows, bytes) else write_jsonl(data, rows)
    out = tmp_path / "out"
    code = sapo.main(train_args(tiny_llama_dir, data, out, *extra))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert message in err, err
    assert (str(data) in err) == (not message.startswith("--columns")), err
    assert not out.exists()


def test_dataset_folder_errors_name_the_row(tmp_path, tiny_llama_dir, capsys):
    folder = hub_folder(tmp_path / "mixed", [FORMATS["alpaca"](0), {"instruction": "a", "input": None, "output": " "}])
    capsys.readouterr()
    code = sapo.main(train_args(tiny_llama_dir, folder, tmp_path / "out"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: {folder}[train] row 1: field 'output' is empty", err
    assert not (tmp_path / "out").exists()


def test_bad_input_subprocess_exit_2_without_traceback(tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [FORMATS["sharegpt"](0), FORMATS["messages"](1)])
    for model, message in ((tiny_llama_dir, f"error: {data}:2: a {{messages}} row, but the first row is "
                            "{conversations} (ShareGPT): one format per dataset"),
                           (tmp_path / "no.gguf", f"error: model '{tmp_path / 'no.gguf'}': no such GGUF file")):
        p = subprocess.run([sys.executable, str(ROOT / "sapo.py"), "--dataset", str(data), "--output-dir",
                            str(tmp_path / "o"), "--model", str(model)],
                           capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
        assert p.returncode == 2 and p.stderr.strip() == message, p.stderr
        assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------
# --model FILE.gguf: de-quantized once into the cache, keyed by path and content hash
# ---------------------------------------------------------------------------------------------------

def make_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama GGUF file (f32 tensors, BPE tokenizer, ChatML template) written with gguf.GGUFWriter."""
    import gguf
    tok = _tokenizer(["<|im_start|>", "<|im_end|>"], CHATML, pad="<|im_end|>")
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    special = {tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
    V, d, ff, heads, kv, layers = len(tokens), 32, 64, 4, 2, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(512), w.add_embedding_length(d), w.add_block_count(layers), w.add_feed_forward_length(ff)
    w.add_head_count(heads), w.add_head_count_kv(kv), w.add_rope_dimension_count(d // heads)
    w.add_layer_norm_rms_eps(1e-5), w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("default"), w.add_token_list(tokens), w.add_token_merges(merges)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(V)])
    w.add_bos_token_id(tok.bos_token_id), w.add_eos_token_id(tok.eos_token_id), w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(CHATML)
    rng = np.random.default_rng(seed)

    def r(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)
    w.add_tensor("token_embd.weight", r(V, d))
    for i in range(layers):
        for name, value in (("attn_norm", np.ones(d, np.float32)), ("attn_q", r(d, d)), ("attn_output", r(d, d)),
                            ("attn_k", r(kv * d // heads, d)), ("attn_v", r(kv * d // heads, d)),
                            ("ffn_norm", np.ones(d, np.float32)), ("ffn_gate", r(ff, d)), ("ffn_up", r(ff, d)),
                            ("ffn_down", r(d, ff))):
            w.add_tensor(f"blk.{i}.{name}.weight", value)
    w.add_tensor("output_norm.weight", np.ones(d, np.float32)), w.add_tensor("output.weight", r(V, d))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def test_gguf_file_is_converted_once_and_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAPO_CACHE", str(tmp_path / "cache"))
    gguf_file = make_tiny_gguf(tmp_path / "tiny.gguf")
    model, tok = sapo_utils.models.load_model_and_tokenizer(str(gguf_file))
    assert type(model).__name__ == "LlamaForCausalLM" and tok.eos_token == "<|im_end|>" and tok.chat_template
    assert capsys.readouterr().out.count("converting") == 1           # the tokenizer and the model share one copy
    (folder,) = (tmp_path / "cache" / "gguf").iterdir()
    assert folder.name.startswith("tiny-") and (folder / "model.safetensors").exists()
    data = write_jsonl(tmp_path / "d.jsonl", [FORMATS["alpaca"](i) for i in range(6)])
    sapo_utils.models._gguf_key.cache_clear()
    assert sapo.main(train_args(gguf_file, data, tmp_path / "out")) == 0
    assert "converting" not in capsys.readouterr().out                 # cached: same path, same content
    make_tiny_gguf(gguf_file, seed=1)                                  # changed in place: a new key, converted again
    sapo_utils.models._gguf_key.cache_clear()
    sapo_utils.models.load_tokenizer(str(gguf_file))
    assert capsys.readouterr().out.count("converting") == 1 and len(list((tmp_path / "cache" / "gguf").iterdir())) == 2


@pytest.mark.parametrize("content", [b"", os.urandom(4096), b"GGUF\x03\x00\x00\x00garbage", "truncated"])
def test_bad_gguf_files_one_line_exit_2(content, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAPO_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    if content == "truncated":
        path.write_bytes(make_tiny_gguf(tmp_path / "full.gguf").read_bytes()[:3000])
    else:
        path.write_bytes(content)
    data = write_jsonl(tmp_path / "d.jsonl", [FORMATS["alpaca"](0)])
    assert sapo.main(train_args(path, data, tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: model '{path}': a local file: GGUF file: "), err
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())
