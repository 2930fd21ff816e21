"""Arithmetic: n-digit addition with its carries written out, a task small enough to train a model on a CPU
and scored exactly.

A prompt is a sum; the answer works through the columns from the units up, one line per column with its carry,
then states the result:

    347+285=            (prompt; the tokenizer's chat template adds the newline that starts the answer)
    7+5=12              units: 7 + 5 = 12, write 2, carry 1
    4+8+1=13            tens:  4 + 8 + the carry = 13, write 3, carry 1
    3+2+1=6             hundreds
    632                 the result (the last line)

So a model's mistakes fall in the middle of its answers (a wrong column sum, a forgotten carry, a digit read off
wrong), where SAPO's regenerated segments land, and the result line can be checked exactly.

Everything is generated from a seed (pure stdlib): train, held-out and test problems are disjoint, where a problem
is the unordered pair {a, b} (347+285 and 285+347 are one problem). Every row is
    {"prompt": "347+285=", "chosen": <the worked answer>, "rejected": <a rule-made wrong one>, "answer": "632"}
`rejected` works the same sum with one fault (a carry dropped, or one column's sum off by one) and carries the
fault through consistently, so its result is wrong; offline DPO/ORPO train on those pairs.

Scoring (`score`): exact_match, the result line equals the true sum; digit_acc, the share of the true sum's digits
that the result line gets right, aligned from the units; working_exact, the whole answer equals `chosen`.

The model: `make_model` writes a tiny random Llama (about 1.3M parameters) and a character-level tokenizer (digits,
'+', '=', newline, and <pad> <unk> </s>) into one folder that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load, as sapo.py does.

CLI::

    python -m tasks.arithmetic data data/arithmetic --seed 0        # train.jsonl, heldout.jsonl, test.jsonl
    python -m tasks.arithmetic make-model runs/arith/init --seed 0   # random-init model + tokenizer
    python -m tasks.arithmetic score answers.jsonl                   # rows with "response" and "answer"
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DIGITS = 3
FAULTS = ("drop_carry", "off_by_one")

# ----------------------------------------------------------------------------- problems and answers


def column_steps(a: int, b: int, digits: int = DIGITS, fault: tuple[str, int, int] | None = None):
    """The column-by-column working of a + b as (line, written digit) pairs, units first, and the result.

    fault: None, ("drop_carry", column, 0): the carry into `column` is forgotten, or ("off_by_one", column, delta):
    that column's sum is misadded by delta. Later columns follow from the faulty ones (a consistent wrong answer)."""
    lines, written, carry = [], [], 0
    for col in range(digits):
        da, db = a // 10 ** col % 10, b // 10 ** col % 10
        carry_in = carry
        if fault and fault[0] == "drop_carry" and fault[1] == col:
            carry_in = 0
        s = da + db + carry_in
        if fault and fault[0] == "off_by_one" and fault[1] == col:
            s += fault[2]
        lines.append(f"{da}+{db}{'+1' if carry_in else ''}={s}")
        written.append(s % 10)
        carry = s // 10
    result = (str(carry) if carry else "") + "".join(str(d) for d in reversed(written))
    return lines, result


def answer_text(a: int, b: int, digits: int = DIGITS, fault=None) -> str:
    lines, result = column_steps(a, b, digits, fault)
    return "\n".join(lines + [result])


def prompt_text(a: int, b: int) -> str:
    return f"{a}+{b}="


def possible_faults(a: int, b: int, digits: int = DIGITS) -> list[tuple[str, int, int]]:
    """Faults that change the result: a carry dropped where there was one, a column sum off by +-1 (kept in 0..19)."""
    faults, carry = [], 0
    for col in range(digits):
        s = a // 10 ** col % 10 + b // 10 ** col % 10 + carry
        if carry:
            faults.append(("drop_carry", col, 0))
        faults += [("off_by_one", col, d) for d in (-1, 1) if 0 <= s + d <= 19]
        carry = s // 10
    return faults


def make_row(a: int, b: int, rng: random.Random, digits: int = DIGITS) -> dict:
    """One row; the rejected answer's fault is drawn from rng, a dropped carry first when the sum has one."""
    faults = possible_faults(a, b, digits)
    drops = [f for f in faults if f[0] == "drop_carry"]
    kind = rng.choice(FAULTS) if drops else "off_by_one"
    fault = rng.choice(drops if kind == "drop_carry" else [f for f in faults if f[0] == "off_by_one"])
    return {"prompt": prompt_text(a, b), "chosen": answer_text(a, b, digits), "rejected": answer_text(a, b, digits, fault),
            "answer": str(a + b), "fault": f"{fault[0]} at column {fault[1]}" + (f" ({fault[2]:+d})" if fault[2] else "")}


def make_splits(seed: int = 0, n_train: int = 20000, n_heldout: int = 500, n_test: int = 2000,
                digits: int = DIGITS) -> dict[str, list[dict]]:
    """Disjoint train / held-out / test rows. Operands are uniform over the n-digit numbers (100..999 for 3);
    a problem is the unordered pair {a, b}, drawn without replacement, so no split repeats another's problem."""
    rng = random.Random(f"arithmetic-{seed}-{digits}")
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    need = n_train + n_heldout + n_test
    if need > (hi - lo + 1) * (hi - lo + 2) // 2:
        raise ValueError(f"{need} problems asked for; {digits}-digit addition has fewer")
    seen, pairs = set(), []
    while len(pairs) < need:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if (min(a, b), max(a, b)) not in seen:
            seen.add((min(a, b), max(a, b)))
            pairs.append((a, b))
    rows = [make_row(a, b, rng, digits) for a, b in pairs]
    return {"train": rows[:n_train], "heldout": rows[n_train: n_train + n_heldout], "test": rows[n_train + n_heldout:]}


def write_splits(out_dir, seed: int = 0, n_train: int = 20000, n_heldout: int = 500, n_test: int = 2000,
                 digits: int = DIGITS) -> dict[str, Path]:
    """train.jsonl, heldout.jsonl, test.jsonl in out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in make_splits(seed, n_train, n_heldout, n_test, digits).items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- scoring


def result_line(response: str) -> str:
    """The answer's result: its last non-empty line, stripped ('' for an empty response)."""
    lines = [ln.strip() for ln in response.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def per_problem(responses: list[str], rows: list[dict]) -> dict[str, list[float]]:
    """Each measure per problem (for paired bootstraps): exact_match (0/1), digit_acc (0..1), working_exact (0/1)."""
    if len(responses) != len(rows):
        raise ValueError(f"{len(responses)} responses for {len(rows)} rows")
    out = {"exact_match": [], "digit_acc": [], "working_exact": []}
    for response, row in zip(responses, rows):
        got, want = result_line(response), row["answer"]
        out["exact_match"].append(float(got == want))
        # digits aligned from the units; a result line with anything but digits gets no digit right
        hits = sum(g == w for g, w in zip(reversed(got), reversed(want))) if got.isdigit() else 0
        out["digit_acc"].append(hits / len(want))
        out["working_exact"].append(float("chosen" in row and response.strip() == row["chosen"].strip()))
    return out


def scorable(row: dict) -> bool:
    """Can `score` read this row? (It needs the sum as digits in "answer".)"""
    return isinstance(row.get("answer"), str) and row["answer"].isdigit()


def score(responses: list[str], rows: list[dict]) -> dict[str, float]:
    """Means over problems: exact_match (result line == the sum), digit_acc, working_exact (answer == chosen).
    rows need "answer" (the sum as digits); working_exact also reads "chosen" (0 where a row has none)."""
    per = per_problem(responses, rows)
    return {k: sum(v) / len(v) if v else 0.0 for k, v in per.items()}


# ----------------------------------------------------------------------------- tokenizer and model

SPECIAL = ("<pad>", "<unk>", "</s>")
SYMBOLS = tuple("0123456789+=\n ")
# The prompt is the user's text (the row's "prompt"); the assistant's answer starts on a new line.
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '\n' }}{% endif %}")


def make_tokenizer():
    """A character-level PreTrainedTokenizerFast: one token per symbol (digits, '+', '=', newline, space), decoded
    by plain concatenation, so newlines survive encode/decode; </s> ends every answer, <pad> pads."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {s: i for i, s in enumerate(SPECIAL + SYMBOLS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")   # every character a token
    tk.decoder = decoders.Fuse()                                                    # join without spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


MODEL_SIZE = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=64)


def make_model(out_dir, seed: int = 0, **size) -> Path:
    """A random-init Llama-shaped causal LM with the character tokenizer, saved to out_dir (save_pretrained)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=None, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True, **{**MODEL_SIZE, **size})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = None
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Arithmetic task: data, tiny model, scoring.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="write train.jsonl, heldout.jsonl, test.jsonl")
    d.add_argument("out")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--n-train", type=int, default=20000)
    d.add_argument("--n-heldout", type=int, default=500)
    d.add_argument("--n-test", type=int, default=2000)
    d.add_argument("--digits", type=int, default=DIGITS)
    m = sub.add_parser("make-model", help="write a random-init tiny Llama and the character tokenizer")
    m.add_argument("out")
    m.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score", help="score a JSONL of rows with 'response' and 'answer'")
    s.add_argument("path")
    args = parser.parse_args(argv)
    if args.cmd == "data":
        for name, path in write_splits(args.out, args.seed, args.n_train, args.n_heldout, args.n_test,
                                       args.digits).items():
            print(f"{name}: {path}")
    elif args.cmd == "make-model":
        from transformers import AutoModelForCausalLM
        out = make_model(args.out, args.seed)
        print(f"{out}: {n_params(AutoModelForCausalLM.from_pretrained(out)) / 1e6:.2f}M parameters")
    else:
        rows = read_rows(args.path)
        print(json.dumps(score([r["response"] for r in rows], rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
