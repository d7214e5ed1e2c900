"""The continual-learning protocol of docs/method.md, built on the FunLoRA tuner.

- `data`: labelled image datasets in memory (the embedded digits, IDX files, Hub datasets, image folders);
- `tasks`: the classes cut into tasks, and one task's images;
- `training`: what each task trains (the backbone in task 0, then one adapter per task) and the randomness of every
  training step;
- `checkpoint`: resumable training states, nothing pickled;
- `importance`: the layer-importance criterion that picks the convs later tasks adapt;
- `evaluation`: CAS, recognition accuracy, forgetting and Frechet distance after each task, and the records of a run.
"""
