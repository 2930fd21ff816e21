"""Dataset rows: read (JSONL/JSON/parquet/CSV files, local or hub `datasets`), recognise the row format, validate,
and return (prompt messages, chosen text, rejected text or None); every bad row is a one-line error naming the
file, line and field; the chat format that turns a row into token ids (encode_example); tokenised examples that
fit the length limits (encode_rows, load_examples -> Example), the held-out split (load_data), and the order
prompts are drawn in (PromptStream). sapo.py imports these; nothing here imports sapo.py."""
from __future__ import annotations

import codecs
import json
import random
from dataclasses import dataclass
from pathlib import Path

from sapo_utils.errors import UserError

REPO_DIR = Path(__file__).resolve().parents[1]
BUNDLED_TRAIN = REPO_DIR / "data" / "ifeval_lite_train.jsonl"
BUNDLED_HELDOUT = REPO_DIR / "data" / "ifeval_lite_heldout.jsonl"



# ----------------------------------------------------------------------------- the chat format: rows -> token ids

def encode_prompt(tok, messages: list[dict]) -> list[int]:
    """x as token ids: the model's chat template, or for base models (gpt2) a plain format,
    'User: ...\\n\\nAssistant: ...\\n\\n' per turn, ending with 'Assistant:'."""
    if tok.chat_template:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # the template already holds BOS where the model wants one
        return tok(text, add_special_tokens=False).input_ids
    turns = [f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages]
    return tok("".join(turns) + "Assistant:").input_ids


def encode_response(tok, text: str) -> list[int]:
    """y as token ids + EOS. In the plain format a response starts with a space."""
    if not tok.chat_template:
        text = " " + text.lstrip()
    return tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]


def encode_example(tok, prompt: list[dict], response: str) -> tuple[list[int], list[int]]:
    """(x, y) as token ids: encode_prompt and encode_response."""
    return encode_prompt(tok, prompt), encode_response(tok, response)


# The row formats, recognised by their fields (present and not null), in order of precedence: the first whose
# required fields a row has wins. (name, required fields, optional fields, how messages show it)
ROW_FORMATS = (
    ("preference", ("prompt", "chosen"), ("rejected",), "{prompt, chosen[, rejected]}"),
    ("prompt-completion", ("prompt", "completion"), (), "{prompt, completion}"),
    ("messages", ("messages",), (), "{messages}"),
    ("sharegpt", ("conversations",), (), "{conversations} (ShareGPT)"),
    ("alpaca", ("instruction", "output"), ("input",), "{instruction[, input], output} (Alpaca)"),
)
_FORMATS = {name: (required, optional, shown) for name, required, optional, shown in ROW_FORMATS}
COLUMN_TARGETS = tuple(dict.fromkeys(f for _, required, optional, _ in ROW_FORMATS for f in required + optional))
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_SHOWN = ", ".join(shown for *_, shown in ROW_FORMATS)
EXPECTED_FORMATS = f"expected one of: {_SHOWN}, or pass --columns (e.g. --columns prompt=question,chosen=answer)"


def _shown(name) -> str:
    """A field name or role as it goes into a one-line message: as is, or JSON-quoted if it holds a line break."""
    name = str(name)
    return name if name.isprintable() else json.dumps(name)


def _messages(value, where: str, field_name: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: field '{field_name}' must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: field '{field_name}[{i}]' must be {{\"role\": str, \"content\": str}}")
    return value


def _text(value, where: str, field_name: str) -> str:
    """A response given as a string, or as a message list whose last turn is the assistant's (TRL style)."""
    if isinstance(value, list):
        value = _messages(value, where, field_name)[-1]["content"]
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{field_name}' must be a string")
    if not value.strip():
        raise UserError(f"{where}: field '{field_name}' is empty")
    return value


def _prompt(value, where: str, field_name: str) -> list[dict]:
    """A prompt given as a string (one user turn) or as a message list."""
    if isinstance(value, list):
        return _messages(value, where, field_name)
    return [{"role": "user", "content": _text(value, where, field_name)}]


def _conversation(msgs: list[dict], where: str, field_name: str) -> tuple[list[dict], str, None]:
    if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
        raise UserError(f"{where}: field '{field_name}' must end with an assistant turn after at least one other turn")
    return msgs[:-1], _text(msgs[-1]["content"], where, f"{field_name}[-1].content"), None


def _sharegpt(value, where: str) -> list[dict]:
    """ShareGPT turns {"from": human|user|gpt|assistant|system, "value": str} (or {role, content}) -> messages."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: field 'conversations' must be a non-empty list of turns")
    msgs = []
    for i, turn in enumerate(value):
        role, content = (turn.get("from"), turn.get("value")) if isinstance(turn, dict) else (None, None)
        if isinstance(turn, dict) and role is None and content is None:
            role, content = turn.get("role"), turn.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise UserError(f"{where}: field 'conversations[{i}]' must be {{\"from\": str, \"value\": str}}")
        if role not in SHAREGPT_ROLES:
            raise UserError(f"{where}: field 'conversations[{i}]' has the unknown role '{_shown(role)}' "
                            f"(known: {', '.join(SHAREGPT_ROLES)})")
        msgs.append({"role": SHAREGPT_ROLES[role], "content": content})
    return msgs


def _parse(fmt: str, row: dict, where: str) -> tuple[list[dict], str, str | None]:
    if fmt == "preference":
        prompt = row["prompt"]
        if isinstance(row["chosen"], list) and len(row["chosen"]) > 1:   # chosen is the whole conversation
            prompt = _messages(row["chosen"], where, "chosen")[:-1]       # (capybara): x = every turn but the last
        else:
            prompt = _prompt(prompt, where, "prompt")
        rejected = _text(row["rejected"], where, "rejected") if row.get("rejected") is not None else None
        return prompt, _text(row["chosen"], where, "chosen"), rejected
    if fmt == "prompt-completion":
        if row.get("label") is False:    # TRL's unpaired preference rows (KTO): an undesirable completion
            raise UserError(f"{where}: field 'label' is false: an undesirable completion cannot be a good "
                            "response y+; keep only the rows with label true")
        prompt, completion = _prompt(row["prompt"], where, "prompt"), row["completion"]
        if isinstance(completion, list):   # conversational: turns before the completion's last belong to x
            prompt = prompt + _messages(completion, where, "completion")[:-1]
        return prompt, _text(completion, where, "completion"), None
    if fmt == "messages":
        return _conversation(_messages(row["messages"], where, "messages"), where, "messages")
    if fmt == "sharegpt":
        return _conversation(_sharegpt(row["conversations"], where), where, "conversations")
    instruction, extra = _text(row["instruction"], where, "instruction"), row.get("input")   # Alpaca
    if extra is not None and not isinstance(extra, str):
        raise UserError(f"{where}: field 'input' must be a string")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction   # Alpaca's own join
    return [{"role": "user", "content": prompt}], _text(row["output"], where, "output"), None


def row_format(row: dict, prefer=()) -> str | None:
    """The first format in ROW_FORMATS whose required fields the row has (not null); formats that use a field
    in `prefer` (the --columns targets) are tried first."""
    order = sorted(ROW_FORMATS, key=lambda f: not set(f[1] + f[2]) & set(prefer))
    return next((name for name, required, *_ in order if all(row.get(k) is not None for k in required)), None)


def parse_row(row, where: str, fmt: str | None = None) -> tuple[list[dict], str, str | None]:
    """One dataset row -> (prompt messages, chosen text, rejected text or None).

    Formats, recognised by their fields in this order of precedence (the first that matches wins; a field that
    is null counts as absent; --columns, applied before this, renames columns and puts the formats it names first):
      1. {prompt, chosen[, rejected]}: strings or TRL message lists; a `chosen` conversation of several turns holds
         the prompt itself (x = all its turns but the last). `rejected` is used only by the offline baselines.
      2. {prompt, completion} (TRL prompt-completion): strings or message lists. A row with `label` false (TRL's
         unpaired preference data) is refused: its completion is not a good answer.
      3. {messages}: role/content turns; x = every turn before the last, which must be the assistant's.
      4. {conversations} (ShareGPT): {from, value} turns; human/user -> user, gpt/assistant -> assistant, system.
      5. {instruction[, input], output} (Alpaca): x = the instruction, then a blank line and the input if non-empty.
    `fmt` (a name in ROW_FORMATS) fixes the format, as the first row of a dataset does for the others."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    found = row_format(row)
    if fmt is not None:
        required, _, shown = _FORMATS[fmt]
        missing = [k for k in required if row.get(k) is None]
        if missing and found is not None:
            raise UserError(f"{where}: a {_FORMATS[found][2]} row, but the first row is {shown}: "
                            "one format per dataset")
        if missing:
            raise UserError(f"{where}: field '{missing[0]}' is missing (the rows here are {shown}, "
                            "as the first row is)")
        found = fmt
    if found is None:
        fields = ", ".join(map(_shown, row))
        raise UserError(f"{where}: unrecognized row with fields [{fields}]; {EXPECTED_FORMATS}")
    return _parse(found, row, where)


def parse_columns(spec: str) -> dict[str, str]:
    """--columns 'prompt=question,chosen=answer' -> {'prompt': 'question', 'chosen': 'answer'} (field -> column)."""
    mapping = {}
    for part in (p.strip() for p in (spec or "").split(",")):
        target, sep, column = (s.strip() for s in part.partition("="))
        if not part:
            continue
        if not sep or not target or not column:
            raise UserError(f"--columns: expected field=column pairs separated by commas "
                            f"(e.g. prompt=question,chosen=answer), got '{part}'")
        if target not in COLUMN_TARGETS:
            raise UserError(f"--columns: unknown field '{target}' (fields: {', '.join(COLUMN_TARGETS)})")
        if target in mapping:
            raise UserError(f"--columns: field '{target}' is mapped twice")
        mapping[target] = column
    return mapping


def _rename(row, mapping: dict, where: str, first: bool):
    if not mapping or not isinstance(row, dict):
        return row
    renamed = {k: v for k, v in row.items() if k not in mapping}
    for target, column in mapping.items():
        if column in row:
            renamed[target] = row[column]
        elif first:
            raise UserError(f"{where}: --columns {target}={column}: the first row has no column '{column}' "
                            f"(its columns: [{', '.join(map(_shown, row))}])")
        elif target not in ("rejected", "input"):
            raise UserError(f"{where}: column '{column}' is missing (--columns {target}={column})")
    return renamed


def parse_rows(rows, columns: str = ""):
    """(where, row) pairs -> (where, row, (prompt messages, chosen, rejected)). The first row fixes the format
    (see parse_row); a later row in another format is an error naming it. `columns` is --columns, checked against
    the first row."""
    mapping, fmt = parse_columns(columns), None
    for where, row in rows:
        renamed = _rename(row, mapping, where, fmt is None)
        if fmt is None and isinstance(renamed, dict):
            if mapping and row_format(renamed, mapping) is None:
                raise UserError(f"{where}: with --columns {columns} the first row has the fields "
                                f"[{', '.join(map(_shown, renamed))}], which make no format; expected one of: {_SHOWN}")
            fmt = row_format(renamed, mapping)
        yield where, row, parse_row(renamed, where, fmt)


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text (byte {e.start})") from None


def _json_file(path: Path, source: str) -> list[tuple[str, object]]:
    """JSON Lines (a UTF-8 byte-order mark and any line endings accepted), or one JSON array of rows (Alpaca's
    alpaca_data.json, ShareGPT dumps): rows are then named file[i]."""
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise UserError(f"{source}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    lines = data.splitlines()   # \n, \r\n and \r
    if data.lstrip()[:1] == b"[":
        text = _decode(data, source)
        first = next(line for line in lines if line.strip())
        try:
            json.loads(first)
            first_ok = True
        except (json.JSONDecodeError, UnicodeDecodeError):
            first_ok = False
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            if not first_ok:
                raise UserError(f"{source}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            items = None
        if isinstance(items, list) and items and (not first_ok or all(isinstance(r, dict) for r in items)):
            return [(f"{source}[{i}]", r) for i, r in enumerate(items)]
    rows = []
    for n, raw in enumerate(lines, 1):
        line = _decode(raw, f"{source}:{n}")
        if not line.strip():
            continue
        try:
            rows.append((f"{source}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{source}:{n}: invalid JSON: {e.msg} (column {e.colno})") from None
    return rows


def read_rows(source: str, split: str = "train") -> list[tuple[str, object]]:
    """(where, row) pairs from a JSONL / JSON file (where = 'file:line'), a .parquet or .csv file, or a hub or
    local-folder `datasets` dataset (where = 'name[split] row i')."""
    path = Path(source)
    tabular = {".parquet": "parquet", ".csv": "csv"}.get(path.suffix.lower())
    if tabular is None and (path.suffix.lower() in (".jsonl", ".json") or path.is_file()):
        if not path.is_file():
            raise UserError(f"{source}: no such file")
        rows = _json_file(path, source)
        if not rows:
            raise UserError(f"{source}: no rows")
        return rows
    if tabular and not path.is_file():
        raise UserError(f"{source}: no such file")
    try:
        import datasets
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()   # its "Generating train split" bars would be stderr lines before an error
        try:
            ds = (datasets.load_dataset(tabular, data_files=str(path), split="train") if tabular
                  else datasets.load_dataset(source, split=split))
        finally:
            if bars:
                datasets.enable_progress_bars()
    except Exception as e:  # the datasets library raises many types for "not found / offline"
        raise UserError(f"dataset '{source}': not a local file, and `datasets` could not load it: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    name = source if tabular else f"{source}[{split}]"
    rows = [(f"{name} row {i}", r) for i, r in enumerate(ds)]
    if not rows:
        raise UserError(f"{name}: no rows")
    return rows



def encode_rows(source: str, encode, max_length: int, max_prompt_length: int, split: str = "train",
                columns: str = "", verbose: bool = True, needs_rejected: str = "") -> list[tuple]:
    """Read, validate and tokenise a dataset: encode(prompt messages, response text) -> (x, y) token ids. Returns
    (x, y+, y- or None, row) for each example that fits; prompts longer than max_prompt_length and examples longer
    than max_length are skipped (y+ is never cut), counted in one line (verbose). needs_rejected: the --method that
    needs every row's `rejected` (an error naming the first row without one)."""
    kept, long_prompts, too_long = [], 0, 0
    for where, row, (prompt, chosen, rejected) in parse_rows(read_rows(source, split), columns):
        if needs_rejected and not rejected:
            raise UserError(f"{where}: --method {needs_rejected} needs a 'rejected' response in every row")
        x, y_pos = encode(prompt, chosen)
        if not x:
            raise UserError(f"{where}: the prompt encodes to no tokens")
        if len(x) > max_prompt_length:
            long_prompts += 1
        elif len(x) + len(y_pos) > max_length:
            too_long += 1
        else:
            y_neg = encode(prompt, rejected)[1] if rejected else None
            kept.append((x, y_pos, y_neg, row if isinstance(row, dict) else None))
    prompt_limit, limit = f"--max-prompt-length={max_prompt_length}", f"--max-length={max_length}"
    if verbose and (long_prompts or too_long):
        print(f"{source}: skipped {long_prompts} prompts longer than {prompt_limit} and {too_long} examples longer "
              f"than {limit}; kept {len(kept)}", flush=True)
    if not kept:
        raise UserError(f"{source}: no usable examples (all {long_prompts + too_long} are too long for "
                        f"{prompt_limit} / {limit})")
    return kept


def held_out_split(cfg, examples: list, load) -> tuple[list, list]:
    """(training examples, held-out examples). Held-out prompts come from --eval-dataset, or the
    bundled held-out file with the bundled data, read by load(source, columns=..., verbose=False);
    else --eval-size examples (at most a fifth) are held out of the shuffled dataset, never trained
    on."""
    source = cfg.eval_dataset
    if not source and Path(cfg.dataset) == BUNDLED_TRAIN:
        source = str(BUNDLED_HELDOUT)
    if source:
        columns = cfg.columns if cfg.eval_dataset else ""
        return examples, load(source, columns=columns, verbose=False)[: cfg.eval_size]
    random.Random(cfg.seed).shuffle(examples)
    n_eval = min(cfg.eval_size, len(examples) // 5)
    return examples[: len(examples) - n_eval], examples[len(examples) - n_eval:]


class PromptStream:
    """Epoch-wise shuffled prompts; (epoch, position) is its whole state, so a resume is exact."""

    def __init__(self, n: int, seed: int, epoch: int = 0, pos: int = 0):
        self.n, self.seed, self.epoch, self.pos = n, seed, epoch, pos

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            order = list(range(self.n))
            random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
            take = order[self.pos: self.pos + k - len(out)]
            out += take
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state_dict(self) -> list[int]:
        return [self.epoch, self.pos]

    def load_state_dict(self, state: list[int]) -> None:
        self.epoch, self.pos = state


# ----------------------------------------------------------------------------- examples: what sapo.py trains on

@dataclass
class Example:
    prompt_ids: list[int]                   # x in the chat format, up to where the answer starts
    chosen_ids: list[int]                   # y+, ending with EOS
    rejected_ids: list[int] | None = None   # a dataset's own y- (offline DPO / ORPO)
    row: dict | None = None                 # the dataset row, for a task's scorer


def load_examples(source: str, tok, max_length: int, max_prompt_length: int,
                  split: str = "train", verbose: bool = True, columns: str = "",
                  encode=encode_example, needs_rejected: str = "") -> list[Example]:
    """The dataset's examples that fit max_length / max_prompt_length (sapo_utils.data reads,
    validates, skips and counts). encode(tok, prompt, response) -> (x, y) is the seam for other
    tokenizers (scale/)."""
    def encode_with_tok(prompt, response):
        return encode(tok, prompt, response)
    rows = encode_rows(source, encode_with_tok, max_length, max_prompt_length, split, columns,
                       verbose, needs_rejected)
    return [Example(x, y_pos, y_neg, row) for x, y_pos, y_neg, row in rows]


def load_data(cfg, tok, needs_rejected: bool):
    """(training examples, held-out examples): sapo_utils.data.held_out_split picks the
    held-out prompts (--eval-dataset, the bundled held-out file, or --eval-size of --dataset)."""
    def load(source, split="train", columns="", verbose=True, needs_rejected=""):
        return load_examples(source, tok, cfg.max_length, cfg.max_prompt_length, split,
                             verbose, columns, needs_rejected=needs_rejected)
    method = cfg.method if needs_rejected else ""
    examples = load(cfg.dataset, cfg.dataset_split, cfg.columns, needs_rejected=method)
    return held_out_split(cfg, examples, load)
