"""Learning-versus-forgetting sweeps: the loop both demos and `kl-nontarget sweep` share.

- `runs`: one LoRA run per (method, kl_weight, seed) through the real trainer classes, and its evaluation;
- `grid`: `run_task` (the plain-LoRA baseline choice, every run of a task) and `write_results`;
- `report` / `plot`: the table, the matched-target-loss comparison and frontier.png from a results dict.
"""
