"""Held-out evaluation during a run: when each measure is due, and the starting model's numbers
the reward measures compare against. What is measured is sapo.py's (passed in as functions):

  measures(model, start) -> dict   log-prob and reward measures against fixed negatives
                                   (sapo.evaluate); start: pi_0's per-prompt sums, or None
  answers(model) -> dict           a task's scores of greedy answers (sapo.task_scores)

Either may be None (turned off, or no task)."""
from __future__ import annotations


class HeldOut:
    def __init__(self, measures, answers, max_steps: int, eval_steps: int, task_eval_steps: int):
        self.measures, self.answers = measures, answers
        self.max_steps, self.eval_steps, self.task_eval_steps = max_steps, eval_steps, task_eval_steps
        self.start = None

    def before(self, model) -> dict | None:
        """Everything, on the starting model pi_0 (its sums become the reward baseline)."""
        result = self.score(model)
        self.start_from(result)
        return result

    def start_from(self, before: dict | None) -> None:
        if before and "per_prompt" in before:
            self.start = (before["per_prompt"]["logps_chosen"],
                          before["per_prompt"]["logps_rejected"])

    def score(self, model) -> dict | None:
        """Every measure, with per-prompt values and the task's answers (before and after)."""
        result = {}
        if self.measures is not None:
            result.update(self.measures(model, self.start))
        if self.answers is not None:
            result.update(self.answers(model))
        return result or None

    def due(self, model, step: int) -> dict:
        """The measures due after this step, as eval/* numbers (the last step's come with
        the log-prob measures; its task scores come with the after-training score)."""
        last = step == self.max_steps
        result = {}
        if self.measures is not None and (last or (self.eval_steps and step % self.eval_steps == 0)):
            result.update(self.measures(model, self.start))
        task_due = self.task_eval_steps and step % self.task_eval_steps == 0
        if self.answers is not None and task_due and not last:
            result.update(self.answers(model))
        return {k: v for k, v in result.items() if k.startswith("eval/")}
