"""Plumbing for sapo.py: what any trainer needs and no learner comes for, one module per concern.

  errors       UserError (one line, exit 2) and Stopped (a stop signal, exit 128 + its number)
  data         dataset rows: read, recognise the format, validate; the held-out split; prompt order
  models       loading models and tokenizers (hub, folders, GGUF, the bundled model, checkpoints)
  cli          flags from config dataclasses, RunOptions, their checks, tasks by name, main()
  optim        optimizer, learning-rate schedule, the step a NaN/inf skips
  run          the output folder (lock, config.json), stop signals, and Run: a run's plumbing
  checkpoints  atomic writes, manifests, save / verify / load, the final model
  report       metrics.jsonl, TensorBoard, samples.jsonl, metrics.png, summary.json
  evaluation   held-out scoring during a run, and a task's scores of greedy answers

Imports run one way: sapo.py imports these; none of them imports sapo.py or tasks/ (tasks are
loaded by name at run time, by cli.load_task)."""
