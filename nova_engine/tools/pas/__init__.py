"""`nova pas`: Baichuan's Prompt Augmentation System (arXiv 2407.06027).

records.py   pool / seeds / output JSONL (file:line errors)
dedup.py     exact + near-duplicate removal (shingles, Jaccard, MinHash LSH)
prompts.py   what the teacher and judge are asked, and how their replies are parsed
generator.py the Generator protocol (prompts -> completions) and Nova-backed models
pipeline.py  build_data: dedup -> categorize -> complements -> judge -> regenerate
augment.py   apply a PAS model to prompts of SFT / preference / RLVR lines
cli.py       the `nova pas build-data | augment` command
demo.py      `make demo-pas` on tiny models
seeds.jsonl  the few-shot seed complements per category (shipped, editable)
"""

from nova_engine.tools.pas.cli import main

__all__ = ["main"]
