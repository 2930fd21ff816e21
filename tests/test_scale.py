"""Tests for scale/: the torchtune recipe against sapo.py, on CPU.

What is compared, and how tightly (measured on the 2-core dev machine, fp32):
  - Parity. `tune run --nproc_per_node 2` (gloo, FSDP2, activation checkpointing) on the tiny Llama-3 of
    scale/tiny.py with batch_size 2 per process, against `sapo.train` in this process on the same
    transformers folder, data and seed with --batch-size 4 (same global batch). top_k = 1 makes the
    negatives greedy, so transformers' generate (sapo.py) and our KV-cached loop pick the same tokens; the
    truncation points and buffer samples come from the same seeded random.Random in both. Per step:
    loss, logps/chosen, logps/rejected, rewards/margins, grad_norm; measured gaps ~1e-6 relative
    (asserted 1e-4 relative). Final policy / EMA / reference weights, the recipe's loaded back with
    transformers: max gap ~1e-6 (asserted 1e-4). DPO over 3 steps with gradient accumulation 2 and a
    reference refresh at the start of step 3 (after 2 completed steps, right after that step's EMA update: the
    authors' rule, and sapo.py's); ORPO over 3 steps. One process with batch_size 4 matches the 2 processes. Both
    sides score each tuple as one row (x and the shared prefix once; torchtune's mask / input_pos in the recipe).
  - Resume. The DPO run above saved steps 2 and 3; a copy with step 3 removed is resumed on 2 processes:
    step 3 reproduces the uninterrupted run exactly (asserted 1e-9; measured 0) and so do the weights.
    LoRA (one process): the same with steps 1-3 and a resume from 2.
  - LoRA (the LoRA config's bf16-mixed, on CPU): step 1's DPO loss is log 2 (the reference is the base with
    adapters disabled and LoRA starts at B = 0); after the refresh the policy and reference differ; the EMA
    adapters saved at step 2 are exactly 0.5 * EMA(1) + 0.5 * policy(1); the reference refreshed at the start of
    step 3 equals the EMA saved at step 3; the merged policy loads in transformers and its v_proj / o_proj weights are base + (alpha / rank) * B @ A
    (to bf16 rounding).
  - Non-finite steps: the recipe run in this process with a NaN loss injected at step 2 skips that optimizer
    step (policy saved after step 2 == after step 1, bit for bit), counts it and goes on.
  - Pieces, in process: sapo.preference_logps with the torchtune forward as its logps_at, and the packed
    torchtune layout, == sapo.preference_logps on the transformers model (1e-4 relative on sums of ~100 tokens);
    greedy KV-cached segments == transformers' generate; per-row seeded sampling does not depend on the batch;
    the top-k / top-p kept sets == transformers' warpers, and sapo_fast.TopKTopPSampler draws from the same
    distribution; the tiktoken tokenizer (a file the test writes) gives the same ids as transformers' tokenizer
    and chat template on all bundled rows; the SentencePiece (Mistral) split of x / y+; dataset.columns maps rows
    as sapo.py's --columns does; the recipe defines no function or class under a core name.
  - Configs: every YAML passes torchtune's config.validate and the recipe's check_config; the 7-8B configs
    build their models and FSDP2 sharding plan on the meta device (no memory, no weights).
  - GPU: one tiny bf16-mixed run, skipped without CUDA.
  - Models and options: a tied-embedding tiny model (Llama-3.2's TiedLinear) under the 8-GPU layout
    (custom_sharded_layers [tok_embeddings, output]) on 2 processes matches 1 process (1e-4); rpo_alpha, dpop_lambda
    and suffix_free on 2 processes match sapo.py (1e-4); Qwen2.5's ChatML split with the pinned tokenizer's masks.
  - Sharded checkpoints: written by 2 processes, resumed on 1 (step 2 within 1e-4 of the uninterrupted run); a
    tampered file skips its checkpoint with one line; NaN weights are never written.
  - One host read per done check with 4 (fake) processes.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sapo  # noqa: E402
import sapo_fast  # noqa: E402
from sapo_utils.evaluation import GREEDY  # noqa: E402
from sapo_utils.models import load_model_and_tokenizer, stop_token_ids  # noqa: E402
from scale import tiny  # noqa: E402

import torchtune  # noqa: E402,F401  (a requirement: the scale tests fail, not skip, without it)
from omegaconf import OmegaConf  # noqa: E402

from scale import fsdp as FS  # noqa: E402
from scale import sapo_recipe as R  # noqa: E402
from scale.gpu_check import host_read_counter  # noqa: E402

CONFIGS = ROOT / "scale" / "configs"
DATA = ROOT / "data" / "ifeval_lite_train.jsonl"
BIG = ["llama3_8b_sapo_dpo.yaml", "mistral_7b_sapo_orpo.yaml", "llama3_8b_sapo_dpo_lora.yaml"]
# the tiny run, as sapo.py flags (tiny_cpu.yaml: batch_size 2 per process x 2 processes, accumulation 2)
SAPO_FLAGS = dict(dataset=str(DATA), eval_dataset=str(DATA), eval_size=0, batch_size=4, grad_accum=2, max_length=384,
                  max_prompt_length=256, segment_len=16, lr=1e-3, ref_update_steps=2, top_k=1, warmup_ratio=0.1,
                  schedule="linear", max_grad_norm=1.0, optimizer="adamw", save_steps=0, num_samples=4, seed=0,
                  generator_dtype="fp32")   # the recipe generates with the model's own (fp32) weights here
COMPARED = ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "grad_norm")


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny.make_tiny_llama3(tmp_path_factory.mktemp("tiny_llama3"))


def tune_run(config: Path, nproc: int, timeout: int = 300, **overrides) -> str:
    """`tune run` the recipe from the repository root (it wants the recipe path relative); returns the log."""
    cmd = ["tune", "run"] + (["--nproc_per_node", str(nproc)] if nproc > 1 else []) + \
          ["scale/sapo_recipe.py", "--config", str(config)] + [f"{k}={v}" for k, v in overrides.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tune = Path(sys.executable).with_name("tune")
    cmd[0] = str(tune) if tune.exists() else cmd[0]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-6000:]}"
    return out


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def assert_close(a: float, b: float, rel: float, what: str):
    assert abs(a - b) <= rel * max(1.0, abs(a), abs(b)), f"{what}: {a} vs {b}"


def hf_state(folder: Path) -> dict:
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


def safetensors_state(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


def max_gap(a: dict, b: dict) -> float:
    common = [k for k in a if k in b and not k.endswith("rotary_emb.inv_freq")]
    assert len(common) >= len(a) - 1, (sorted(a)[:4], sorted(b)[:4])
    return max((a[k].float() - b[k].float()).abs().max().item() for k in common)


def sapo_train(out: Path, model_dir: Path, **flags) -> Path:
    cfg = sapo.Config(model=str(model_dir), output_dir=str(out), **{**SAPO_FLAGS, **flags})
    sapo.train(cfg)
    return out


def tiny_torchtune_model(model_dir: Path, tmp: Path):
    """The tiny model as torchtune's llama3, loaded with torchtune's HF checkpointer, with output selection."""
    from torchtune.models.llama3 import llama3
    from torchtune.training import FullModelHFCheckpointer
    ck = FullModelHFCheckpointer(checkpoint_dir=str(model_dir), checkpoint_files=["model.safetensors"],
                                 model_type="LLAMA3", output_dir=str(tmp / "tt_out"))
    model = llama3(vocab_size=tiny.TINY_VOCAB, **tiny.TINY_MODEL)
    model.load_state_dict(ck.load_checkpoint()["model"])
    R.enable_position_selection(model)
    return model.eval()


def tiny_tokenizer(model_dir: Path):
    from torchtune.models.llama3 import llama3_tokenizer
    return llama3_tokenizer(str(model_dir / "original" / "tokenizer.model"), special_tokens_path=str(model_dir / "tokenizer.json"))


# ----------------------------------------------------------------------------- tokenizers

def test_tiktoken_tokenizer_matches_transformers(tiny_dir):
    """The tiny tiktoken file (written by scale/tiny.py) through torchtune's Llama3Tokenizer gives the ids that
    sapo.py gets from transformers' tokenizer + Llama-3 chat template, on every bundled row, with the same skips."""
    from transformers import AutoTokenizer
    tt = tiny_tokenizer(tiny_dir)
    hf = AutoTokenizer.from_pretrained(tiny_dir)
    ours = sapo.load_examples(str(DATA), tt, 384, 256, verbose=False, encode=R.encode_torchtune_example)
    theirs = sapo.load_examples(str(DATA), hf, 384, 256, verbose=False)
    assert len(ours) == len(theirs) > 300
    for a, b in zip(ours, theirs):
        assert a.prompt_ids == b.prompt_ids and a.chosen_ids == b.chosen_ids
    assert ours[0].chosen_ids[-1] == tt.eot_id == hf.eos_token_id      # y+ ends with end-of-turn
    assert ours[0].prompt_ids[0] == tt.bos_id and tt.decode(ours[0].prompt_ids[-4:], skip_special_tokens=False).endswith("<|end_header_id|>\n\n")
    assert sorted(tt.stop_tokens) == sorted(stop_token_ids(load_model_and_tokenizer(str(tiny_dir))[0], hf))


def test_sentencepiece_tokenizer_split(tmp_path):
    """Mistral's SentencePiece tokenizer: x is [BOS] [INST] prompt [/INST], y+ the response and </s>, and
    x + y+ is exactly what torchtune's tokenize_messages writes."""
    spm = pytest.importorskip("sentencepiece")
    from torchtune.data import Message
    from torchtune.models.mistral import mistral_tokenizer
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join((tiny.CORPUS + ["[INST] Explain this. [/INST] Sure."]) * 5))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "spm"), vocab_size=120,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    tok = mistral_tokenizer(str(tmp_path / "spm.model"))
    prompt, chosen = [{"role": "user", "content": "Explain tea."}], "Tea is brewed with hot water."
    e = sapo.Example(*R.encode_torchtune_example(tok, prompt, chosen))
    full, _ = tok.tokenize_messages([Message("user", "Explain tea.", masked=True), Message("assistant", chosen)])
    assert e.prompt_ids + e.chosen_ids == full
    assert e.prompt_ids[0] == tok.bos_id and e.chosen_ids[-1] == tok.eos_id
    assert tok.decode(e.chosen_ids[:-1]).strip() == chosen and "[/INST]" in tok.decode(e.prompt_ids)


def write_qwen_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """A tiny byte-level BPE in Qwen2's file format (vocab.json: GPT-2's byte-to-unicode alphabet, ids 0-255;
    merges.txt: a few merges learned by scale/tiny.py's BPE); torchtune's Qwen2.5 tokenizer puts its special tokens
    (<|endoftext|>, <|im_start|>, <|im_end|> ...) at their real ids, 151643 and up."""
    from torchtune.models.qwen2._tokenizer import bytes_to_unicode
    alphabet = bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    merges = []
    for token in list(tiny.train_bpe(tiny.CORPUS, 40))[256:]:
        text = "".join(alphabet[b] for b in token)
        pair = next((text[:i], text[i:]) for i in range(1, len(text)) if text[:i] in vocab and text[i:] in vocab)
        merges.append(" ".join(pair))
        vocab[text] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def test_qwen2_5_chat_split(tmp_path):
    """Qwen2.5's tokenizer as pinned (torchtune 0.6.1's Qwen2_5Tokenizer: no tokenize_message), on a tiny vocab.json
    / merges.txt written here: x is the ChatML prompt up to and including the assistant header
    (`<|im_start|>assistant\\n`), with the config's default system message where a row has none, and y+ the answer
    plus <|im_end|>, one of the tokenizer's stop tokens. Checked against the tokenizer's own masks (x + y+ is what
    tokenize_messages writes, the assistant turn unmasked from its header on) and against the text Qwen's chat
    template writes, encoded."""
    from torchtune.data import Message
    from torchtune.models.qwen2_5 import qwen2_5_tokenizer
    vocab, merges = write_qwen_tokenizer_files(tmp_path / "qwen")
    tok = qwen2_5_tokenizer(str(vocab), str(merges))
    assert not hasattr(tok, "tokenize_message")
    system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    prompt, answer = [{"role": "user", "content": "How is tea brewed?"}], "Pour hot water over leaves."
    x, y = R.encode_torchtune_example(tok, prompt, answer, system_prompt=system)
    text = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt[0]['content']}<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert x == tok.encode(text, add_bos=False, add_eos=False)
    assert y == tok.encode(answer, add_bos=False, add_eos=False) + [tok.im_end_id] and tok.im_end_id in tok.stop_tokens
    tokens, mask = tok.tokenize_messages([Message("system", system, masked=True), Message("user", prompt[0]["content"], masked=True),
                                          Message("assistant", answer, masked=False)])
    header = tok.encode("<|im_start|>assistant\n", add_bos=False, add_eos=False)
    assert tokens == x + y and mask == [True] * (len(x) - len(header)) + [False] * (len(header) + len(y))
    # a row with its own system message keeps it; no system prompt configured: none is added
    own = [{"role": "system", "content": "Be brief."}] + prompt
    assert tok.decode(R.encode_torchtune_example(tok, own, answer, system_prompt=system)[0]).count("Be brief.") == 1
    x_plain, y_plain = R.encode_torchtune_example(tok, prompt, answer)
    assert x_plain == tok.encode(text[text.index("<|im_start|>user"):], add_bos=False, add_eos=False) and y_plain == y


def test_columns_map_rows_as_in_sapo_py(tiny_dir, tmp_path):
    """dataset.columns is sapo.py's --columns: the recipe's loader reads rows through sapo_utils.data.parse_rows, so
    renamed columns give the examples the standard fields give; a bad mapping is a one-line ConfigError."""
    tt = tiny_tokenizer(tiny_dir)
    rows = [json.loads(line) for line in open(DATA)][:20]
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({"question": r["prompt"], "answer": r["chosen"]}) + "\n" for r in rows))
    standard = tmp_path / "standard.jsonl"
    standard.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"]}) + "\n" for r in rows))
    a = sapo.load_examples(str(renamed), tt, 384, 256, verbose=False, columns="prompt=question,chosen=answer",
                           encode=R.encode_torchtune_example)
    b = sapo.load_examples(str(standard), tt, 384, 256, verbose=False, encode=R.encode_torchtune_example)
    assert len(a) == len(b) > 0 and [(e.prompt_ids, e.chosen_ids) for e in a] == [(e.prompt_ids, e.chosen_ids) for e in b]
    cfg = OmegaConf.load(CONFIGS / "tiny_cpu.yaml")
    cfg.dataset.columns = "prompt=question,answer"
    with pytest.raises(R.ConfigError, match="dataset.columns"):
        R.check_recipe_config(cfg)


def _core_modules():
    import importlib
    import pkgutil
    import sapo_utils
    return [sapo, sapo_fast] + [importlib.import_module(f"sapo_utils.{m.name}") for m in pkgutil.iter_modules(sapo_utils.__path__)]


def _statements(fn_node) -> list[str]:
    """A function's statements as AST dumps, docstring left out, every identifier renamed by order of first
    appearance (a copy with renamed variables or arguments dumps the same)."""
    import ast
    body = list(fn_node.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    names: dict[str, str] = {}

    class Rename(ast.NodeTransformer):
        def visit_Name(self, node):
            return ast.copy_location(ast.Name(id=names.setdefault(node.id, f"v{len(names)}"), ctx=node.ctx), node)

        def visit_arg(self, node):
            node.arg = names.setdefault(node.arg, f"v{len(names)}")
            return node
    return [ast.dump(Rename().visit(ast.parse(ast.unparse(st)).body[0])) for st in body]


def _functions(module) -> dict[str, list[str]]:
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(module))
    return {f"{module.__name__}.{n.name}": _statements(n) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _core_modules():
    import importlib
    import pkgutil
    import sapo_utils
    return [sapo, sapo_fast] + [importlib.import_module(f"sapo_utils.{m.name}") for m in pkgutil.iter_modules(sapo_utils.__path__)]


def _body(fn_node) -> list:
    """A function's statements, docstring left out."""
    import ast
    body = list(fn_node.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    return body


def _renamed(statements) -> tuple[str, ...]:
    """Statements as AST dumps with every identifier renamed by order of first appearance among them: a copy
    with renamed variables or arguments dumps the same."""
    import ast
    import copy
    names: dict[str, str] = {}

    class Rename(ast.NodeTransformer):
        def visit_Name(self, node):
            return ast.copy_location(ast.Name(id=names.setdefault(node.id, f"v{len(names)}"), ctx=node.ctx), node)

        def visit_arg(self, node):
            node.arg = names.setdefault(node.arg, f"v{len(names)}")
            return node
    return tuple(ast.dump(Rename().visit(copy.deepcopy(st)), annotate_fields=False) for st in statements)


def _functions(module) -> dict[str, list]:
    import ast
    import inspect
    tree = ast.parse(inspect.getsource(module))
    return {f"{module.__name__}.{n.name}": _body(n) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _copies(ours: list, core: dict[str, tuple]) -> list[str]:
    """The core functions whose whole body (renamed alike) is a run of consecutive statements in `ours`."""
    found = []
    kinds = [type(st).__name__ for st in ours]
    for n in sorted({len(b) for b in core.values()}):
        wanted = {b: name for name, b in core.items() if len(b) == n}
        shapes = {tuple(d.split("(", 1)[0] for d in b) for b in wanted}      # statement kinds, a cheap first filter
        for i in range(len(ours) - n + 1):
            if tuple(kinds[i:i + n]) in shapes and (hit := wanted.get(_renamed(ours[i:i + n]))) is not None:
                found.append(hit)
    return found


def test_recipe_defines_no_twins():
    """Every function or class the recipe defines has a name of its own: none shadows a name of sapo.py, sapo_fast.py
    or sapo_utils/ (a twin with another body would drift from the core). And no function in scale/ holds a copy of a
    core function's body (two statements or more, identifiers renamed alike), whole or as a run of its statements."""
    import importlib
    core = _core_modules()
    own = {name for name, value in vars(R).items() if getattr(value, "__module__", None) == R.__name__}
    for module in core:
        assert not own & set(vars(module)), (module.__name__, sorted(own & set(vars(module))))
    core_bodies = {k: _renamed(v) for m in core for k, v in _functions(m).items() if len(v) >= 2}
    for name in ("sapo_recipe", "fsdp", "simulate", "memory", "tiny", "gpu_check", "host_memory"):
        for ours, statements in _functions(importlib.import_module(f"scale.{name}")).items():
            assert not _copies(statements, core_bodies), f"{ours} repeats the body of {_copies(statements, core_bodies)}"


def test_twin_check_finds_a_renamed_copy():
    """The body check above catches a copy whose names differ: sapo_fast.packing_verdict's body, renamed, whole and
    as two statements among others in a longer function."""
    import ast
    core = {"sapo_fast.packing_verdict": _renamed(_functions(sapo_fast)["sapo_fast.packing_verdict"])}
    copy = ast.parse('def verdict(p, q, m, t=1e-4):\n    "doc"\n'
                     "    ok = all(torch.allclose(a.float(), b.float(), atol=t, rtol=t) for a, b in zip(p, q))\n"
                     "    return ok and not torch.equal(p[1], m[1])\n").body[0]
    inside = ast.parse("def probe(model, x, y, moved, tol):\n    z = model(x)\n"
                       "    agree = all(torch.allclose(a.float(), b.float(), atol=tol, rtol=tol) for a, b in zip(x, y))\n"
                       "    return agree and not torch.equal(x[1], moved[1])\n").body[0]
    assert _copies(_body(copy), core) == _copies(_body(inside), core) == ["sapo_fast.packing_verdict"]
    assert _copies(_body(copy)[:1], core) == []


# ----------------------------------------------------------------------------- log-probs and generation

def test_logps_match_sapo_sequence_logps(tiny_dir, tmp_path):
    """Per-sequence summed log-probs of response tokens: sapo.preference_logps with the torchtune forward as its
    logps_at (the output layer at response positions only), and the packed torchtune layout, == sapo.py's plain
    two rows on the transformers model."""
    hf_model, hf_tok = load_model_and_tokenizer(str(tiny_dir))
    tt_model = tiny_torchtune_model(tiny_dir, tmp_path)
    ex = sapo.load_examples(str(DATA), hf_tok, 384, 256, verbose=False)[:5]
    batch = [{"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids, "rejected_ids": e.chosen_ids[: 7 + 3 * i]}
             for i, e in enumerate(ex)]
    with torch.no_grad():
        two_rows = R.two_row_torchtune_logps(tt_model, batch, hf_tok.pad_token_id, "cpu")
        packed = R.packed_torchtune_logps(tt_model, batch, hf_tok.pad_token_id, "cpu")
        plain = sapo.preference_logps(hf_model, batch, hf_tok.pad_token_id, "cpu")
    for ours in (two_rows, packed):
        for x, y in zip(ours, plain):
            torch.testing.assert_close(x.float(), y.float(), rtol=1e-4, atol=1e-3)


def test_greedy_segments_match_transformers_generate(tiny_dir, tmp_path):
    """top_k = 1 in our KV-cached loop (left padding, torchtune masks and positions) == transformers' greedy
    generate via sapo.generate_segments, on contexts of different lengths, up to and including the first stop."""
    hf_model, hf_tok = load_model_and_tokenizer(str(tiny_dir))
    tt_model = tiny_torchtune_model(tiny_dir, tmp_path)
    ex = sapo.load_examples(str(DATA), hf_tok, 384, 256, verbose=False)[:4]
    contexts = [e.prompt_ids + e.chosen_ids[: 5 * i] for i, e in enumerate(ex)]
    new = [12, 5, 12, 9]
    stop = stop_token_ids(hf_model, hf_tok)
    ours = R.torchtune_generate(tt_model, contexts, new, hf_tok.pad_token_id, stop, GREEDY, [0] * 4)
    theirs = sapo.generate_segments(hf_model, contexts, new, hf_tok.pad_token_id, stop, GREEDY)

    def upto_stop(s):
        return next((s[: i + 1] for i, t in enumerate(s) if t in stop), s)
    assert ours == [upto_stop(s) for s in theirs]        # each segment ends at its first stop token, or its limit
    assert all(len(s) <= n for s, n in zip(ours, new))


def test_decoding_steps_read_nothing_on_the_host(tiny_dir, tmp_path, monkeypatch):
    """The recipe's decoding loop reads no device value per layer or per token (torchtune's KVCache.update asserts
    on one in every layer; the sampler's tie count and the `done` check read one per token): 32 more decoding steps
    cost at most the two `done` checks due in them. Stopping at every step or every 16 gives the same segments."""
    tt_model = tiny_torchtune_model(tiny_dir, tmp_path)
    tok = tiny_tokenizer(tiny_dir)
    contexts = [tok.encode("Tea is brewed", add_eos=False), tok.encode("The water cycle moves", add_eos=False)]
    kw = dict(pad_id=tok.pad_id, stop_ids=[], sampling=sapo.segment_sampling(0.7, 50, 0.95), seeds=[1, 2])

    def reads(n):
        with host_read_counter() as mode:
            R.torchtune_generate(tt_model, contexts, [n, n], **kw)
        return mode.n
    assert reads(48) - reads(16) <= 2
    stop = tok.stop_tokens
    kw["stop_ids"] = stop
    every_16 = R.torchtune_generate(tt_model, contexts, [40, 40], **kw)
    monkeypatch.setattr(R, "DONE_CHECK_EVERY", 1)
    assert R.torchtune_generate(tt_model, contexts, [40, 40], **kw) == every_16


def test_done_check_is_one_host_read_with_many_processes(tiny_dir, tmp_path):
    """With several processes, each `done` check of the decoding loop is one host read: the flag is all-reduced
    where it is and read once (scale.fsdp.all_processes), not read, all-reduced and read again. On a fake process
    group of 4 (collectives return at once): one agreement, one read; 32 more decoding steps, two checks, two reads."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    tt_model = tiny_torchtune_model(tiny_dir, tmp_path)
    tok = tiny_tokenizer(tiny_dir)
    contexts = [tok.encode("Tea is brewed", add_eos=False), tok.encode("The water cycle moves", add_eos=False)]
    kw = dict(pad_id=tok.pad_id, stop_ids=[], sampling=sapo.segment_sampling(0.7, 50, 0.95), seeds=[1, 2])
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        with host_read_counter() as mode:
            assert FS.all_processes(torch.tensor(False), "cpu") is False
        assert mode.n == 1

        def reads(n):
            with host_read_counter() as mode:
                R.torchtune_generate(tt_model, contexts, [n, n], **kw)
            return mode.n
        assert reads(48) - reads(16) == 2
    finally:
        dist.destroy_process_group()


def test_cached_attention_equals_torchtunes(tiny_dir, tmp_path):
    """The decoding attention (grouped k/v straight into SDPA, enable_gqa) gives torchtune's own attention's
    logits at every step (4 query heads on 2 kv heads here), and so the same greedy segments."""
    from torchtune.modules import local_kv_cache
    tt_model = tiny_torchtune_model(tiny_dir, tmp_path)
    assert tt_model.layers[0].attn.num_heads != tt_model.layers[0].attn.num_kv_heads
    tok = tiny_tokenizer(tiny_dir)
    ids = torch.tensor([tok.encode("Tea is brewed with hot water and", add_eos=False)])
    L, n = ids.shape[1], 6
    mask = torch.ones(L + n, L + n, dtype=torch.bool).tril()[None]
    pos = torch.arange(L + n)[None]
    logits = []
    for cache in (local_kv_cache, R.sync_free_kv_cache):
        with torch.no_grad(), cache(tt_model, batch_size=1, device=torch.device("cpu"), dtype=torch.float32,
                                    decoder_max_seq_len=L + n):
            assert ("forward" in vars(tt_model.layers[0].attn)) == (cache is R.sync_free_kv_cache)
            out = [tt_model(ids, input_pos=pos[:, :L], mask=mask[:, :L])[:, -1]]
            for k in range(n - 1):
                nxt = out[-1].argmax(-1, keepdim=True)
                out.append(tt_model(nxt, input_pos=pos[:, L + k, None], mask=mask[:, L + k, None])[:, -1])
        logits.append(torch.stack(out))
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(tt_model.layers[0].attn)          # torchtune's own forward is back


def test_sampler_ties_without_a_host_read():
    """kept(max_ties=n) (no host read of the tie count) keeps the top-k set the exact count keeps, ties with the
    k-th token included, while at most n tokens tie. (Where equal tokens straddle the top-p cut, which of them
    is kept follows topk's order of equal values on both paths, as in transformers' sort.)"""
    g = torch.Generator().manual_seed(0)
    scores = (torch.randn(64, 300, generator=g) * 2).to(torch.bfloat16).float()   # bf16 logits tie often
    scores[:, :20] = scores[:, :1]                                                 # and 20 exact ties
    for k in (1, 5, 19, 50):
        exact = sapo_fast.TopKTopPSampler(0.7, k, 1.0).kept(scores)
        capped = sapo_fast.TopKTopPSampler(0.7, k, 1.0).kept(scores, max_ties=64)
        dense = [torch.zeros_like(scores).scatter(-1, idx, p) for p, idx in (exact, capped)]
        torch.testing.assert_close(dense[0], dense[1])


def test_sampling_is_seeded_per_row(tiny_dir, tmp_path):
    """A row's sampled segment depends on its seed, not on the other rows of the batch (so not on the number
    of processes either); different seeds give different segments."""
    tt_model = tiny_torchtune_model(tiny_dir, tmp_path)
    tok = tiny_tokenizer(tiny_dir)
    a, b = tok.encode("Tea is brewed", add_eos=False), tok.encode("The water cycle moves water between", add_eos=False)
    kw = dict(pad_id=tok.pad_id, stop_ids=tok.stop_tokens, sampling=sapo.segment_sampling(0.7, 50, 0.95))
    both = R.torchtune_generate(tt_model, [a, b], [10, 10], seeds=[11, 22], **kw)
    alone = R.torchtune_generate(tt_model, [b], [10], seeds=[22], **kw)
    other = R.torchtune_generate(tt_model, [b], [10], seeds=[23], **kw)
    assert both[1] == alone[0] and alone[0] != other[0]


def test_compiled_decode_step_matches_eager(tiny_dir, tmp_path, caplog):
    """compile_decode: the one-token step under torch.compile with fullgraph (the sync-free KV cache update and the
    grouped attention trace without a break; aot_eager here, inductor / CUDA graphs on a GPU) writes the same
    sampled tokens as the eager loop, and with a fixed cache_len a second call with other contexts reuses the
    graph. A backend that fails falls back to the eager step, with one warning, and the same tokens."""
    tt_model = tiny_torchtune_model(tiny_dir, tmp_path)
    tok = tiny_tokenizer(tiny_dir)
    texts = [["Tea is brewed", "The water cycle moves water between"], ["Rain falls", "A cat sat on the mat and"]]
    calls = [[tok.encode(t, add_eos=False) for t in pair] for pair in texts]
    kw = dict(pad_id=tok.pad_id, stop_ids=tok.stop_tokens, sampling=sapo.segment_sampling(0.7, 50, 0.95),
              seeds=[3, 4])
    eager = [R.torchtune_generate(tt_model, c, [12, 12], **kw) for c in calls]
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)
    torch._dynamo.reset()
    step = R.compiled_decode_step(tt_model, counting)
    assert [R.torchtune_generate(tt_model, c, [12, 12], decode_step=step, cache_len=64, **kw) for c in calls] == eager
    assert 1 <= len(graphs) <= 2, len(graphs)      # one graph (a second at most, for the cache position's first use)

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here (injected)")
    torch._dynamo.reset()
    with caplog.at_level("WARNING"):
        fallback = R.compiled_decode_step(tt_model, broken)
        assert [R.torchtune_generate(tt_model, c, [12, 12], decode_step=fallback, cache_len=64, **kw)
                for c in calls] == eager
    assert sum("did not compile" in r.getMessage() for r in caplog.records) == 1


def test_sampling_filters_match_transformers():
    """The kept set of temperature + top-k + top-p (sapo_fast.TopKTopPSampler.kept, which the recipe's race and
    sapo.py's default sampler share) is transformers' (TopKLogitsWarper, TopPLogitsWarper), and the recipe's
    exponential race draws from the renormalised kept probabilities."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 40, generator=g) * 3
    for top_k, top_p in [(0, 0.9), (5, 1.0), (10, 0.5), (50, 0.95)]:
        p, idx = sapo_fast.TopKTopPSampler(0.7, top_k, top_p).kept(logits)
        ours = torch.zeros_like(logits).scatter(-1, idx, p) > 0
        x = TemperatureLogitsWarper(0.7)(None, logits.clone())
        if top_k:
            x = TopKLogitsWarper(top_k)(None, x)
        if top_p < 1:
            x = TopPLogitsWarper(top_p)(None, x)
        assert torch.equal(ours, x > float("-inf")), (top_k, top_p)
    row = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(20000, 4)
    noise = torch.empty(20000, 4).exponential_(1, generator=g)
    draws = R.sample_next(row, noise, 1.0, 0, 0.7)                      # top-p 0.7 keeps {0, 1}: 0.625 / 0.375
    assert set(draws.tolist()) == {0, 1} and abs((draws == 0).float().mean().item() - 0.625) < 0.015
    assert set(R.sample_next(row, noise, 1.0, 1, 1.0).tolist()) == {0}   # top_k 1: greedy
    torch.manual_seed(0)
    scores = torch.randn(1, 12) * 2
    kept, idx = sapo_fast.TopKTopPSampler(0.7, 6, 0.9).kept(scores)
    p = torch.zeros(12).scatter(0, idx[0], kept[0])
    p = p / p.sum()
    race_noise = torch.empty(40000, 12).exponential_(1, generator=g)
    drawn = R.sample_next(scores.expand(40000, 12), race_noise, 0.7, 6, 0.9)   # the race draws from p
    freq = torch.bincount(drawn, minlength=12).float() / 40000
    assert torch.equal(freq > 0, p > 0) and (freq - p).abs().max() < 0.015, (freq, p)


# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_config_validates(name):
    from torchtune import config
    cfg = OmegaConf.load(CONFIGS / name)
    config.validate(cfg)        # every _component_ resolves and its arguments bind
    R.check_recipe_config(cfg)  # every key the recipe reads, with its constraint
    head = (CONFIGS / name).read_text().split("\n\n")[0]
    assert "tune run" in head and "scale/sapo_recipe.py" in head and f"scale/configs/{name}" in head


@pytest.fixture
def one_process_group():
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("name", BIG)
def test_big_configs_build_and_shard_on_meta(name, one_process_group):
    """The 7-8B models (policy, and the frozen EMA/reference) are built by their configured builders on the meta
    device and get the recipe's FSDP2 plan (prepare_model with shard=True): every parameter a DTensor, every
    layer and the custom-sharded embeddings/output an FSDP unit, activation checkpointing on the policy only."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from torchtune import config, training
    from torchtune.modules import TransformerSelfAttentionLayer
    cfg = OmegaConf.load(CONFIGS / name)
    lora = FS.is_lora(cfg.model)
    for trainable in (True, False):
        with training.set_default_dtype(torch.bfloat16), torch.device("meta"):
            model = config.instantiate(cfg.model)
        FS.prepare_model(model, cfg, trainable=trainable, shard=True)
        params = list(model.named_parameters())
        assert all(p.is_meta and isinstance(p, DTensor) for _, p in params)
        n = sum(p.numel() for _, p in params if "lora" not in _)
        assert n == {"mistral": 7_241_732_096}.get(name.split("_")[0], 8_030_261_248)
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        assert len(units) == len(model.layers) + len(cfg.custom_sharded_layers or []) + 1
        checkpointed = any("_checkpoint_wrapped_module" in n for n, _ in params)
        assert checkpointed == trainable and not isinstance(model.layers[0], TransformerSelfAttentionLayer) == trainable
        trained = [n for n, p in params if p.requires_grad]
        if lora:   # adapters only, in fp32 under bf16-mixed
            assert trained and all("lora" in n for n in trained)
            assert all(p.dtype == torch.float32 for n, p in params if "lora" in n)
            assert sum(p.numel() for n, p in params if "lora" in n) == 19_660_800        # rank 8 on q, v, output_proj and the MLP, 32 layers
            break
        assert (len(trained) == len(params)) == trainable


# ----------------------------------------------------------------------------- runs: parity and resume

@pytest.fixture(scope="module")
def dpo_runs(tiny_dir, tmp_path_factory):
    """The tiny SAPO-DPO run on 2 gloo processes (tiny_cpu.yaml, greedy negatives), and sapo.py on the same."""
    tmp = tmp_path_factory.mktemp("dpo")
    log = tune_run(CONFIGS / "tiny_cpu.yaml", 2, model_dir=tiny_dir, output_dir=tmp / "recipe", top_k=1)
    assert "log-probs: one packed segment per tuple (shared prefix)" in log        # torchtune honours mask / input_pos here
    sapo_train(tmp / "sapo", tiny_dir, method="sapo-dpo", max_steps=3)
    return tmp / "recipe", tmp / "sapo"


def test_distributed_dpo_matches_sapo_py(dpo_runs):
    recipe, ref = dpo_runs
    a, b = metrics(recipe / "metrics.jsonl"), metrics(ref / "metrics.jsonl")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
    assert a[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)        # policy == reference at step 1
    assert a[-1]["loss"] < a[0]["loss"] - 0.05                         # and the losses move
    # every per-step figure both write, but timings and memory (one generate call per step on both sides)
    shared = [k for k in a[0] if k in b[0] and not k.startswith(("time/", "gen/", "memory/", "shape/"))]
    assert set(COMPARED) | {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "lr", "buffer/size"} <= set(shared)
    for x, y in zip(a, b):
        for k in shared:
            assert_close(x[k], y[k], 1e-4, f"step {x['step']} {k}")
    assert [s["rejected_marked"] for s in map(json.loads, open(recipe / "samples.jsonl"))] == \
           [s["rejected_marked"] for s in map(json.loads, open(ref / "samples.jsonl"))]
    # weights: the recipe's transformers folders (torchtune's HF checkpointer) vs sapo.py's final model / checkpoint
    assert max_gap(hf_state(recipe / "policy" / "epoch_3"), hf_state(ref / "final")) < 1e-4
    ckpt = ref / "checkpoints" / "step-00000003"
    for name in ("ema", "ref"):
        assert max_gap(hf_state(recipe / name / "epoch_3"), safetensors_state(ckpt / f"{name}.safetensors")) < 1e-4


def test_one_process_matches_two_processes(dpo_runs, tmp_path, tiny_dir):
    """The unsharded path (one process, batch_size 4) computes what 2 sharded processes with batch_size 2 do."""
    recipe, _ = dpo_runs
    tune_run(CONFIGS / "tiny_cpu.yaml", 1, model_dir=tiny_dir, output_dir=tmp_path / "one", top_k=1, batch_size=4,
             save_every_n_steps=0)
    for x, y in zip(metrics(recipe / "metrics.jsonl"), metrics(tmp_path / "one" / "metrics.jsonl"), strict=True):
        for k in COMPARED:
            assert_close(x[k], y[k], 1e-4, f"step {x['step']} {k}")


def test_compiled_decode_in_a_sharded_run(dpo_runs, tmp_path, tiny_dir):
    """compile_decode on 2 sharded processes (the EMA's weights gathered for the call): the step compiles without
    falling back and the run computes what the eager one does."""
    recipe, _ = dpo_runs
    log = tune_run(CONFIGS / "tiny_cpu.yaml", 2, model_dir=tiny_dir, output_dir=tmp_path / "compiled", top_k=1,
                   compile_decode=True, compile_backend="aot_eager", max_steps=2, save_every_n_steps=0)
    assert "did not compile" not in log, log[-3000:]
    for x, y in zip(metrics(recipe / "metrics.jsonl")[:2], metrics(tmp_path / "compiled" / "metrics.jsonl"), strict=True):
        for k in COMPARED:
            assert_close(x[k], y[k], 1e-4, f"step {x['step']} {k}")


def test_resume_continues_like_an_uninterrupted_run(dpo_runs, tmp_path, tiny_dir):
    """Checkpoint at step 2 of the run above (policy, EMA, reference, optimizer, buffer, data position, RNG,
    step); a crash after step 2 is a copy without step 3. Resuming on 2 processes reproduces step 3, which
    starts with the EMA update and the reference refresh due after 2 steps."""
    recipe, _ = dpo_runs
    out = tmp_path / "resumed"
    shutil.copytree(recipe, out)
    for name in ("policy", "ema", "ref"):
        shutil.rmtree(out / name / "epoch_3")
    (out / "recipe_state" / "step_3.pt").unlink()
    log = tune_run(CONFIGS / "tiny_cpu.yaml", 2, model_dir=tiny_dir, output_dir=out, top_k=1, resume_from_checkpoint=True)
    assert "resuming from" in log and "step_2.pt" in log
    a, b = metrics(recipe / "metrics.jsonl"), metrics(out / "metrics.jsonl")
    assert [m["step"] for m in b] == [1, 2, 3]                         # lines after the checkpoint are rewritten
    for x, y in zip(a[2:], b[2:]):
        for k in COMPARED + ("rewards/chosen", "lr", "buffer/size"):
            assert abs(x[k] - y[k]) <= 1e-9, (x["step"], k, x[k], y[k])
    for name in ("policy", "ema", "ref"):
        assert max_gap(hf_state(recipe / name / "epoch_3"), hf_state(out / name / "epoch_3")) <= 1e-9


def test_distributed_orpo_matches_sapo_py(tiny_dir, tmp_path):
    """SAPO-ORPO: the NLL's token mean runs over the global batch (all-reduced count), so 2 processes match one."""
    tune_run(CONFIGS / "tiny_cpu.yaml", 2, model_dir=tiny_dir, output_dir=tmp_path / "recipe", top_k=1,
             method="sapo-orpo", max_steps=3, gradient_accumulation_steps=1, save_every_n_steps=0)
    sapo_train(tmp_path / "sapo", tiny_dir, method="sapo-orpo", max_steps=3, grad_accum=1)
    a, b = metrics(tmp_path / "recipe" / "metrics.jsonl"), metrics(tmp_path / "sapo" / "metrics.jsonl")
    assert len(a) == len(b) == 3 and a[-1]["loss"] < a[0]["loss"]
    for x, y in zip(a, b):
        for k in COMPARED + ("nll_loss", "log_odds_ratio"):
            assert_close(x[k], y[k], 1e-4, f"step {x['step']} {k}")
    assert not (tmp_path / "recipe" / "ref").exists()                 # ORPO has no reference


def test_loss_options_match_sapo_py(tiny_dir, tmp_path):
    """sapo.py's DPO options through the recipe, one copy of the math (sapo.preference_loss): rpo_alpha's NLL(y+)
    term (a token mean over the global batch, all-reduced count), dpop_lambda's DPOP penalty and suffix_free's
    Step-DPO pairs (sapo.make_negatives cuts y+ at t+G) on 2 processes give sapo.py's per-step figures in one."""
    options = dict(rpo_alpha=0.5, dpop_lambda=2.0, suffix_free=True)
    tune_run(CONFIGS / "tiny_cpu.yaml", 2, model_dir=tiny_dir, output_dir=tmp_path / "recipe", top_k=1, max_steps=2,
             gradient_accumulation_steps=1, save_every_n_steps=0, **options)
    sapo_train(tmp_path / "sapo", tiny_dir, method="sapo-dpo", max_steps=2, grad_accum=1, **options)
    a, b = metrics(tmp_path / "recipe" / "metrics.jsonl"), metrics(tmp_path / "sapo" / "metrics.jsonl")
    assert len(a) == len(b) == 2 and "nll_loss" in a[0]
    assert a[0]["loss"] == pytest.approx(math.log(2) + 0.5 * a[0]["nll_loss"], abs=1e-5)   # DPO's log 2 + alpha * NLL
    for x, y in zip(a, b):
        for k in COMPARED + ("nll_loss", "rewards/chosen"):
            assert_close(x[k], y[k], 1e-4, f"step {x['step']} {k}")
    samples = [json.loads(line) for line in open(tmp_path / "recipe" / "samples.jsonl")]
    assert samples == [json.loads(line) for line in open(tmp_path / "sapo" / "samples.jsonl")]


def test_nonfinite_step_is_skipped(tiny_dir, tmp_path, one_process_group, monkeypatch):
    """The recipe in this process (one-process group): a NaN loss injected at step 2 skips that optimizer step
    (the policy saved after step 2 is the one after step 1), is counted, and training goes on."""
    from safetensors.torch import load_file
    cfg = OmegaConf.load(CONFIGS / "tiny_cpu.yaml")
    cfg.update(model_dir=str(tiny_dir), output_dir=str(tmp_path / "run"), max_steps=3, batch_size=2,
               gradient_accumulation_steps=1, save_every_n_steps=1, keep_last_n_checkpoints=3)
    recipe = R.SAPORecipe(cfg)
    recipe.setup(cfg)
    clean_loss = recipe._loss

    def poisoned(batch):
        loss, m = clean_loss(batch)
        if recipe.step == 1:                                           # during step 2
            loss, m["loss"] = loss * float("nan"), float("nan")
        return loss, m
    monkeypatch.setattr(recipe, "_loss", poisoned)
    recipe.train()
    m = metrics(tmp_path / "run" / "metrics.jsonl")
    assert [x["nonfinite/skipped"] for x in m] == [0, 1, 1] and math.isfinite(m[2]["loss"])
    w = [load_file(str(tmp_path / "run" / "policy" / f"epoch_{s}" / "model-00001-of-00001.safetensors")) for s in (1, 2, 3)]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0]) and not all(torch.equal(w[1][k], w[2][k]) for k in w[0])
    recipe._prune(keep=1)                                              # keep_last_n_checkpoints: the newest stays
    run = tmp_path / "run"
    assert [p.name for p in (run / "recipe_state").iterdir()] == ["step_3.pt"]
    assert sorted(p.name for p in (run / "policy").iterdir()) == sorted(p.name for p in (run / "ema").iterdir()) == ["epoch_3"]


# ----------------------------------------------------------------------------- LoRA

def tiny_lora_config(tmp: Path) -> Path:
    """tiny_cpu.yaml with the LoRA settings and dtype of llama3_8b_sapo_dpo_lora.yaml (bf16-mixed: bf16 base,
    fp32 adapters, bf16 autocast, which runs on CPU too) on the tiny shapes."""
    cfg = OmegaConf.load(CONFIGS / "tiny_cpu.yaml")
    lora = OmegaConf.load(CONFIGS / "llama3_8b_sapo_dpo_lora.yaml").model
    model = OmegaConf.to_container(cfg.model)
    model["_component_"] = "torchtune.models.llama3.lora_llama3"
    for k in ("lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output", "lora_rank", "lora_alpha", "lora_dropout"):
        model[k] = lora[k]
    cfg.model = model
    cfg.update(max_steps=3, save_every_n_steps=1, keep_last_n_checkpoints=3, gradient_accumulation_steps=1,
               dtype=OmegaConf.load(CONFIGS / "llama3_8b_sapo_dpo_lora.yaml").dtype)
    OmegaConf.save(cfg, tmp / "tiny_lora.yaml")
    return tmp / "tiny_lora.yaml"


def test_lora_one_process(tiny_dir, tmp_path):
    config = tiny_lora_config(tmp_path)
    out = tmp_path / "lora"
    tune_run(config, 1, model_dir=tiny_dir, output_dir=out)
    m = metrics(out / "metrics.jsonl")
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and m[0]["rewards/margins"] == 0.0
    assert m[-1]["loss"] < m[1]["loss"] < m[0]["loss"] - 0.005    # measured 0.693, 0.687, 0.683 (rank-8 adapters)
    # step 3 compares the policy with the refreshed reference (EMA adapters swapped into the same module):
    # they differ (a shared autocast region once made them equal through autocast's cast cache)
    assert abs(m[2]["rewards/margins"]) > 1e-3

    def adapters(name, step):
        return torch.load(out / name / f"epoch_{step}" / "adapter_model.pt", weights_only=True)
    ema1, ema2, pol1 = adapters("ema", 1), adapters("ema", 2), adapters("policy", 1)
    assert ema2.keys() == pol1.keys() and all("lora" in k for k in ema2)
    for k in ema2:                                                     # theta_ema <- 0.5 theta_ema + 0.5 theta, adapters only
        torch.testing.assert_close(ema2[k], 0.5 * ema1[k] + 0.5 * pol1[k], rtol=0, atol=1e-7)
    # the refresh due after 2 steps happens at the start of step 3, right after its EMA update (the authors' rule):
    # until then the reference is the base (adapters off, nothing saved); then it equals the EMA saved at step 3
    assert not (out / "ref" / "epoch_1").exists() and not (out / "ref" / "epoch_2").exists()
    ref3, ema3 = adapters("ref", 3), adapters("ema", 3)
    assert all(torch.equal(ref3[k], ema3[k]) for k in ema3) and not all(torch.equal(ema2[k], ema3[k]) for k in ema3)
    assert not list((out / "ema" / "epoch_2").glob("model-*.safetensors"))
    assert all(v.dtype == torch.float32 for v in pol1.values())          # adapters trained in fp32
    # the merged policy loads in transformers: W = W_base + (alpha / rank) * B @ A, in the base's bf16 (v_proj
    # and o_proj keep their layout between torchtune and transformers)
    merged, base, pol3 = hf_state(out / "policy" / "epoch_3"), hf_state(tiny_dir), adapters("policy", 3)
    scale = 16 / 8
    for tt_name, hf_name in (("attn.v_proj", "self_attn.v_proj"), ("attn.output_proj", "self_attn.o_proj")):
        for i in range(2):
            delta = scale * pol3[f"layers.{i}.{tt_name}.lora_b.weight"] @ pol3[f"layers.{i}.{tt_name}.lora_a.weight"]
            key = f"model.layers.{i}.{hf_name}.weight"
            assert delta.abs().max() > 2e-3                                # a few bf16 steps at these weights
            expected = (base[key].bfloat16() + delta).bfloat16().float()
            torch.testing.assert_close(merged[key], expected, rtol=0, atol=0)
    # resume from step 2 (LoRA adapters, EMA and reference adapters, optimizer) reproduces step 3
    resumed = tmp_path / "lora_resumed"
    shutil.copytree(out, resumed)
    for name in ("policy", "ema", "ref"):
        shutil.rmtree(resumed / name / "epoch_3")
    (resumed / "recipe_state" / "step_3.pt").unlink()
    tune_run(config, 1, model_dir=tiny_dir, output_dir=resumed, resume_from_checkpoint=True)
    x, y = m[-1], metrics(resumed / "metrics.jsonl")[-1]
    assert y["step"] == 3 and all(abs(x[k] - y[k]) <= 1e-9 for k in COMPARED)


# ----------------------------------------------------------------------------- GPU

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_mixed_run(tiny_dir, tmp_path):
    """The tiny config on CUDA in bf16-mixed (fp32 master weights, bf16 EMA/reference, bf16 autocast);
    NCCL with 2 processes when there are 2 GPUs."""
    nproc = min(2, torch.cuda.device_count())
    tune_run(CONFIGS / "tiny_cpu.yaml", nproc, model_dir=tiny_dir, output_dir=tmp_path / "gpu", device="cuda",
             dtype="bf16-mixed", batch_size=4 // nproc, max_steps=3)
    m = metrics(tmp_path / "gpu" / "metrics.jsonl")
    assert len(m) == 3 and all(math.isfinite(x["loss"]) for x in m) and m[0]["loss"] == pytest.approx(math.log(2), abs=1e-2)


# ----------------------------------------------------------------------------- tied embeddings under the shipped layout

def test_tied_embeddings_train_under_the_shipped_layout(tmp_path):
    """A model whose output layer is its embeddings' weight (tie_word_embeddings, torchtune's TiedLinear: Llama-3.2
    1B / 3B, Qwen2.5 up to 3B, Gemma), a Llama-3.2-shaped tiny model named in no config, under the 8-GPU configs'
    layout `custom_sharded_layers: [tok_embeddings, output]` with nothing else overridden: 2 sharded processes train
    it and compute what one unsharded process does (the recipe keeps a tied output's embeddings in the root unit:
    scale.fsdp.custom_units; given a unit of their own, the output layer read a sharded weight and the step failed
    with "aten.mm got mixed torch.Tensor and DTensor"). Step 1's DPO loss is log 2, the losses move, and the saved
    policy loads in transformers with its output tied to its trained embeddings."""
    folder = tiny.make_tiny_llama3(tmp_path / "tied", tied=True)
    tied = {"model._component_": "torchtune.models.llama3_2.llama3_2", "checkpointer.model_type": "LLAMA3_2",
            "custom_sharded_layers": "[tok_embeddings,output]", "model_dir": folder, "top_k": 1, "max_steps": 2}
    two, one = tmp_path / "two", tmp_path / "one"
    tune_run(CONFIGS / "tiny_cpu.yaml", 2, output_dir=two, **tied)
    tune_run(CONFIGS / "tiny_cpu.yaml", 1, output_dir=one, batch_size=4, save_every_n_steps=0, **tied)
    a, b = metrics(two / "metrics.jsonl"), metrics(one / "metrics.jsonl")
    assert [m["step"] for m in a] == [1, 2]
    assert a[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and a[1]["loss"] != a[0]["loss"]
    for x, y in zip(a, b, strict=True):
        for k in COMPARED:
            assert_close(x[k], y[k], 1e-4, f"step {x['step']} {k}")
    from transformers import AutoModelForCausalLM
    trained = AutoModelForCausalLM.from_pretrained(two / "policy" / "epoch_2", dtype=torch.float32)
    start = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    emb = trained.get_input_embeddings().weight
    assert trained.get_output_embeddings().weight.data_ptr() == emb.data_ptr()      # still tied
    assert (emb - start.get_input_embeddings().weight).abs().max() > 0            # and trained


# ----------------------------------------------------------------------------- sharded checkpoints

def test_sharded_checkpoints_resume_on_another_process_count(tiny_dir, tmp_path, capsys):
    """checkpoint_format: sharded (scale/sharded_checkpoint.py). 2 gloo processes write checkpoints/step_N/, each
    process its own file of shards (torch.distributed.checkpoint), a manifest of every file's size and sha256, no
    transformers folders and no recipe_state/. A copy cut back to step 1 resumes on ONE process (batch_size 4: the
    same global batch) and repeats step 2 of the uninterrupted run (1e-4, as one process against two). A file that
    does not match the manifest makes the resume skip that checkpoint with one line and take the one before; a
    .tmp- folder (a crash mid-write) is never taken."""
    import torch.distributed as dist
    from scale import sharded_checkpoint as SC
    run = tmp_path / "run"
    tune_run(CONFIGS / "tiny_cpu.yaml", 2, model_dir=tiny_dir, output_dir=run, top_k=1, checkpoint_format="sharded",
             save_every_n_steps=1, keep_last_n_checkpoints=3, max_steps=2)
    root = run / "checkpoints"
    assert [p.name for p in SC.checkpoint_dirs(root)] == ["step_1", "step_2"]
    assert not (run / "recipe_state").exists() and not [p for p in run.glob("policy/**/*") if p.is_file()]
    manifest = json.loads((root / "step_2" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and {"__0_0.distcp", "__1_0.distcp", ".metadata", "trainer.pt"} == set(manifest["files"])
    assert {p.name for p in (root / "step_2").iterdir()} == set(manifest["files"]) | {"manifest.json"}

    one = tmp_path / "one"
    shutil.copytree(run, one)
    shutil.rmtree(one / "checkpoints" / "step_2")
    shutil.copytree(one / "checkpoints" / "step_1", one / "checkpoints" / ".tmp-step_2")   # a write that never finished
    log = tune_run(CONFIGS / "tiny_cpu.yaml", 1, model_dir=tiny_dir, output_dir=one, top_k=1, checkpoint_format="sharded",
                   save_every_n_steps=1, keep_last_n_checkpoints=3, batch_size=4, resume_from_checkpoint=True, max_steps=2)
    assert f"resuming from {one / 'checkpoints' / 'step_1'}" in log
    a, b = metrics(run / "metrics.jsonl"), metrics(one / "metrics.jsonl")
    assert [m["step"] for m in b] == [1, 2]
    for k in COMPARED + ("rewards/chosen", "lr", "buffer/size"):
        assert_close(a[1][k], b[1][k], 1e-4, f"step 2 {k}")
    assert json.loads((one / "checkpoints" / "step_2" / "manifest.json").read_text())["world_size"] == 1

    # tampered: one byte of process 1's file in step_2 -> skipped, step_1 taken
    target = run / "checkpoints" / "step_2" / "__1_0.distcp"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        lines = []
        assert SC.latest(run / "checkpoints", "cpu", say=lines.append) == run / "checkpoints" / "step_1"
        assert lines == [f"skipping checkpoint {run / 'checkpoints' / 'step_2'}: __1_0.distcp is missing or does not "
                         "match its manifest"]
        # NaN weights are never written: one line, and no folder
        with pytest.raises(sapo_errors().UserError, match="NaN/inf"):
            SC.save(tmp_path / "nan", 5, {"w": torch.tensor([1.0, float("nan")])}, {"step": 5}, "cpu", keep=1)
        assert not (tmp_path / "nan" / "step_5").exists()
        # a round trip in one process: the state dict filled in place, the trainer state returned
        saved = SC.save(tmp_path / "rt", 7, {"w": torch.arange(4.0)}, {"step": 7}, "cpu", keep=1)
        into = {"w": torch.zeros(4)}
        assert SC.load(saved, into, "cpu") == {"step": 7} and torch.equal(into["w"], torch.arange(4.0))
    finally:
        dist.destroy_process_group()


def sapo_errors():
    import sapo_utils.errors
    return sapo_utils.errors
