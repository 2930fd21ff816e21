"""Held-out evaluation during a run: the task's scores of greedy answers (task_scores), and when each
measure is due (HeldOut). What is measured on the preference side is sapo.evaluate (passed in): DPO's
implicit rewards and ORPO's log odds against negatives written once by the starting model."""
from __future__ import annotations

# generate's arguments for the answers a task scores: greedy, so the score depends on the model only
GREEDY = {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}


def task_scores(model, tok, examples: list, task, stop_ids, max_new_tokens: int, generate,
                batch_size: int = 16) -> dict:
    """Greedy answers to the held-out prompts the task can score (task.scorable(row), default all), and
    the task's scores of them as eval/<name> floats, with the answers under "responses".
    generate(model, contexts, max_new_tokens, pad_id, stop_ids, sampling) writes the answers."""
    scorable = getattr(task, "scorable", lambda row: True)
    rows = [e for e in examples if e.row is not None and scorable(e.row)]
    if not rows:
        return {}
    answers = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i: i + batch_size]
        outs = generate(model, [e.prompt_ids for e in chunk], [max_new_tokens] * len(chunk),
                        tok.pad_token_id, stop_ids, GREEDY)
        answers += [tok.decode(o, skip_special_tokens=True).strip() for o in outs]
    scores = task.score(answers, [e.row for e in rows])
    numbers = {f"eval/{k}": v for k, v in scores.items() if isinstance(v, float)}
    return {**numbers, "responses": answers}


class HeldOut:
    """The held-out prompts of a run, scored before training, every --eval-steps (the log-prob and
    reward measures) and every --task-eval-steps (the task), and after training.

    tuples: the held-out (x, y+, y-) tuples with negatives written once by the starting model pi_0 (empty:
    no log-prob measures). measures(model, tuples, pad_id, device, beta, start, batch_size, logps_fn) is
    sapo.evaluate; start is pi_0's per-prompt sums, the baseline of the rewards. autocast() gives the
    run's autocast context."""

    def __init__(self, cfg, tok, examples, tuples, task, stop_ids, ops, device, autocast, measures):
        self.cfg, self.tok, self.examples, self.tuples, self.task = cfg, tok, examples, tuples, task
        self.stop_ids, self.ops, self.device = stop_ids, ops, device
        self.autocast, self.measures = autocast, measures
        self.start = None

    def _measures(self, model) -> dict:
        if not self.tuples:
            return {}
        cfg = self.cfg
        with self.autocast():
            return self.measures(model, self.tuples, self.tok.pad_token_id, self.device, cfg.beta,
                                 self.start, cfg.batch_size, self.ops.preference_logps)

    def _answers(self, model) -> dict:
        if self.task is None or not self.examples:
            return {}
        with self.autocast():
            return task_scores(model, self.tok, self.examples, self.task, self.stop_ids,
                               self.cfg.eval_max_new_tokens, self.ops.answer)

    def before(self, model) -> dict | None:
        """Everything, on the starting model pi_0 (its sums become the rewards' baseline)."""
        result = self.score(model)
        self.start_from(result)
        return result

    def start_from(self, before: dict | None) -> None:
        if before and "per_prompt" in before:
            self.start = (before["per_prompt"]["logps_chosen"],
                          before["per_prompt"]["logps_rejected"])

    def score(self, model) -> dict | None:
        """Every measure, with per-prompt values and the task's answers (before and after)."""
        return {**self._measures(model), **self._answers(model)} or None

    def due(self, model, step: int) -> dict:
        """The measures due after this step, as eval/* numbers. The last step gets the log-prob
        measures; its task scores come with the after-training score."""
        cfg, last, result = self.cfg, step == self.cfg.max_steps, {}
        if last or (cfg.eval_steps and step % cfg.eval_steps == 0):
            result.update(self._measures(model))
        if cfg.task_eval_steps and step % cfg.task_eval_steps == 0 and not last:
            result.update(self._answers(model))
        return {k: v for k, v in result.items() if k.startswith("eval/")}


def evaluate_model(cfg, task, load_examples, collate, ops) -> dict:
    """--eval-only: a model's mean per-token log-prob of y+ on the held-out prompts and, with a task,
    its scores of greedy answers; nothing is trained or written. load_examples, collate and ops
    (sequence_logps, answer) are sapo.py's."""
    import torch
    from sapo_utils.data import BUNDLED_HELDOUT
    from sapo_utils.models import load_model, load_tokenizer, pick_device, stop_token_ids
    tok, device = load_tokenizer(cfg.model, cfg.trust_remote_code), pick_device(cfg.device)
    source = cfg.eval_dataset or str(BUNDLED_HELDOUT)
    columns = cfg.columns if cfg.eval_dataset else ""
    examples = load_examples(source, tok, cfg.max_length, cfg.max_prompt_length,
                             verbose=False, columns=columns)[: cfg.eval_size]
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    model = load_model(cfg.model, dtype, device, cfg.trust_remote_code).eval()
    pairs = [(e.prompt_ids, e.chosen_ids) for e in examples]
    with torch.no_grad():
        sums = [ops.sequence_logps(model, **collate(pairs[i: i + cfg.batch_size],
                                                    tok.pad_token_id, device))
                for i in range(0, len(pairs), cfg.batch_size)]
    logps, counts = (torch.cat(t) for t in zip(*sums))
    result = {"model": cfg.model, "eval_dataset": source, "n_prompts": len(examples),
              "eval/logps_chosen_per_token": (logps / counts).mean().item()}
    if task is not None:
        result.update(task_scores(model, tok, examples, task, stop_token_ids(model, tok),
                                  cfg.eval_max_new_tokens, ops.answer))
    return result
